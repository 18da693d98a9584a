"""The time-to-quality benchmark's table and verdicts, from made-up cells (no training)."""

import json
import statistics

import pytest
from benchload import load_benchmark

ttq = load_benchmark("time_to_quality.py", "time_to_quality_under_test")
BUDGETS = (60.0, 180.0, 600.0)


def _cell(method: str, name: str, kls: dict[float, float], at: tuple[float, ...] = BUDGETS):
    """A finished cell whose snapshots at the given training times have these paired KLs (the
    gap is made equal to the KL; a snapshot is 'at' a budget when its time is one)."""
    snapshots = [{"seconds": t, "at": t if t in at else None, "step": int(10 * t),
                  "gap_nats": kl, "nll_se": 0.005, "kl_nats": kl, "nfe": 100,
                  "full": t in at or t == max(kls)}
                 for t, kl in sorted(kls.items())]
    return {"method": method, "dataset": name, "snapshots": snapshots, "sampling": []}


def _cells():
    return {
        # rings: ot-cfm passes FFJORD's final KL (0.40) at 60 s: 10x sooner
        ("rings", "ffjord"): _cell("ffjord", "rings", {60.0: 0.76, 180.0: 0.52, 600.0: 0.40}),
        ("rings", "ot-cfm"): _cell("ot-cfm", "rings", {30.0: 0.5, 60.0: 0.36, 180.0: 0.12,
                                                       600.0: 0.016}),
        ("rings", "zuko"): _cell("zuko", "rings", {60.0: 0.93, 180.0: 0.70, 600.0: 0.68}),
        # 8gaussians: FFJORD ends at 0.0014 and the 60-s flow-matching run stops at 0.0061
        ("8gaussians", "ffjord"): _cell("ffjord", "8gaussians",
                                        {60.0: 0.18, 180.0: 0.014, 600.0: 0.0014}),
        ("8gaussians", "ot-cfm-fourier-60s"): _cell("ot-cfm-fourier-60s", "8gaussians",
                                                    {10.0: 0.06, 45.0: 0.015, 60.0: 0.0061},
                                                    at=(60.0,)),
        ("8gaussians", "zuko"): _cell("zuko", "8gaussians",
                                      {60.0: 0.078, 180.0: 0.046, 600.0: 0.0053}),
    }


def test_speedup_and_zuko_verdicts():
    _, verdicts = ttq.summarize(_cells(), BUDGETS)
    rings = verdicts["rings"]
    assert rings["ffjord_kl"] == 0.40 and rings["best_time_to_ffjord_quality"] == 60.0
    assert rings["speedup"] == pytest.approx(10.0)
    assert rings["smaller_gap_than_zuko_at_every_budget"] is True
    line = ttq.verdict_line("rings", rings, 600.0)
    assert line == ("- rings: the best flowlab CNF other than FFJORD reaches FFJORD's 600-s "
                    "paired KL (0.4000 nats) at 60 s (10x sooner); smaller gap than zuko at "
                    "every budget: yes")


def test_a_quality_never_reached_is_said_in_words_with_the_closest_run():
    _, verdicts = ttq.summarize(_cells(), BUDGETS)
    gauss = verdicts["8gaussians"]
    assert gauss["best_time_to_ffjord_quality"] is None and gauss["speedup"] is None
    assert gauss["closest"] == {"kl_nats": 0.0061, "seconds": 60.0,
                                "method": "ot-cfm-fourier-60s"}
    # flow matching's 0.0061 at 60 s is below zuko at 60 s (0.078) and, as a model there to
    # use, at 180 s (0.046); at 600 s so is ffjord's 0.0014 (zuko: 0.0053)
    assert gauss["smaller_gap_than_zuko_at_every_budget"] is True
    line = ttq.verdict_line("8gaussians", gauss, 600.0)
    assert line == ("- 8gaussians: no other flowlab CNF reaches FFJORD's 600-s paired KL "
                    "(0.0014 nats) in the runs made (closest: ot-cfm-fourier-60s, 0.0061 nats "
                    "at 60 s); smaller gap than zuko at every budget: yes")
    assert "never s" not in line


def test_a_noisy_snapshot_off_the_budgets_does_not_count_as_reaching_ffjords_quality():
    cells = _cells()
    # a 2,000-point evaluation at 45 s that happens to fall below FFJORD's final KL
    cells[("8gaussians", "ot-cfm-ml")] = _cell("ot-cfm-ml", "8gaussians",
                                               {30.0: 0.03, 45.0: 0.0010, 60.0: 0.0041},
                                               at=(60.0,))
    _, verdicts = ttq.summarize(cells, BUDGETS)
    gauss = verdicts["8gaussians"]
    assert gauss["best_time_to_ffjord_quality"] is None
    assert gauss["closest"] == {"kl_nats": 0.0041, "seconds": 60.0, "method": "ot-cfm-ml"}
    # the same value in a full evaluation at 60 s counts
    cells[("8gaussians", "ot-cfm-ml")]["snapshots"][-1]["kl_nats"] = 0.0012
    _, verdicts = ttq.summarize(cells, BUDGETS)
    assert verdicts["8gaussians"]["best_time_to_ffjord_quality"] == 60.0


def test_table_rows_show_the_budgets_and_the_time_to_quality():
    table, _ = ttq.summarize(_cells(), BUDGETS)
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in table.splitlines()}
    ot = rows[("rings", "ot-cfm")]
    assert "+0.360 ± 0.005 | +0.120 ± 0.005 | +0.016 ± 0.005" in ot
    assert "| 0.0160 | " in ot  # KL at 600 s
    fast = rows[("8gaussians", "ot-cfm-fourier-60s")]
    assert "+0.006 ± 0.005 | - | -" in fast and "| > budget |" in fast


def _write_snapshots(folder, entries):
    import json

    (folder / "snapshots").mkdir(parents=True)
    (folder / "snapshots" / "snapshots.json").write_text(json.dumps(
        [{"at": at, "file": f"t{at:05.0f}.safetensors", "seconds": at + 0.01, "step": step}
         for at, step in entries]))


def test_a_pretrained_cell_joins_its_two_parts_on_one_clock(tmp_path):
    split = ttq.PRETRAIN["ot-cfm-ml"][0]
    _write_snapshots(tmp_path / "pretrain", [(10.0, 900), (20.0, 1800), (split, 2700)])
    _write_snapshots(tmp_path / "finetune", [(15.0, 200), (60.0 - split, 410)])
    index = ttq._snapshot_index(tmp_path, "ot-cfm-ml")
    assert [e["at"] for e in index] == [10.0, 20.0, split, split + 15.0, 60.0]
    assert [e["step"] for e in index] == [900, 1800, 2700, 2900, 3110]
    assert [e["dir"] for e in index] == ["pretrain"] * 3 + ["finetune"] * 2
    assert index[-1]["seconds"] == pytest.approx(split + 0.01 + 30.01)
    assert index[-1]["file"] == f"t{60.0 - split:05.0f}.safetensors"
    # a one-part cell reads its own folder
    _write_snapshots(tmp_path / "plain", [(60.0, 5000)])
    assert ttq._snapshot_index(tmp_path / "plain", "ot-cfm")[0]["dir"] == ""
    with pytest.raises(SystemExit, match="no snapshots.json"):
        ttq._snapshot_index(tmp_path / "missing", "ot-cfm")


def test_zuko_is_compared_with_the_best_gap_reached_by_each_budget():
    cells = _cells()
    # 2spirals as measured: ffjord trails zuko at 180 s, the 60-s flow-matching model does not
    cells[("2spirals", "ffjord")] = _cell("ffjord", "2spirals",
                                          {60.0: 0.69, 180.0: 0.36, 600.0: 0.11})
    cells[("2spirals", "ot-cfm-fourier-60s")] = _cell("ot-cfm-fourier-60s", "2spirals",
                                                      {30.0: 0.07, 60.0: 0.019}, at=(60.0,))
    cells[("2spirals", "zuko")] = _cell("zuko", "2spirals", {60.0: 0.78, 180.0: 0.338,
                                                             600.0: 0.159})
    by = {b: ttq.best_flowlab_gap_by({m: cells[("2spirals", m)] for m in ("ffjord",
                                      "ot-cfm-fourier-60s")}, b) for b in BUDGETS}
    assert by == {60.0: 0.019, 180.0: 0.019, 600.0: 0.019}
    _, verdicts = ttq.summarize(cells, BUDGETS)
    assert verdicts["2spirals"]["smaller_gap_than_zuko_at_every_budget"] is True
    # zuko ahead of everything flowlab has by 600 s: no
    cells[("2spirals", "zuko")]["snapshots"][-1]["gap_nats"] = 0.01
    _, verdicts = ttq.summarize(cells, BUDGETS)
    assert verdicts["2spirals"]["smaller_gap_than_zuko_at_every_budget"] is False


def test_merge_keeps_the_published_cells_and_adds_the_new_ones(tmp_path):
    """--merge: the published json (no density grids) plus the cells finished under --runs,
    which replace published cells of the same method and dataset."""
    results, runs = tmp_path / "results", tmp_path / "runs"
    results.mkdir()
    published = {("8gaussians", m): {**c, "budget": 600.0, "entropy": 2.83}
                 for (name, m), c in _cells().items() if name == "8gaussians"}
    (results / "time_to_quality.json").write_text(json.dumps(
        {"command": "python benchmarks/time_to_quality.py --jobs 2", "verdicts": {},
         "cells": list(published.values())}))
    new = {**_cell("cfm-avg-fourier-60s", "8gaussians", {30.0: 0.01, 60.0: 0.0012}, at=(60.0,)),
           "budget": 60.0, "entropy": 2.83, "density": [[0.0] * 80] * 80}
    (runs / "8gaussians" / "cfm-avg-fourier-60s").mkdir(parents=True)
    (runs / "8gaussians" / "cfm-avg-fourier-60s" / ttq.CELL).write_text(json.dumps(new))
    ttq.main(["--table-only", "--merge", "--runs", str(runs), "--results", str(results)])
    merged = json.loads((results / "time_to_quality.json").read_text())
    assert {(c["dataset"], c["method"]) for c in merged["cells"]} == {
        *published, ("8gaussians", "cfm-avg-fourier-60s")}
    assert merged["command"].startswith("python benchmarks/time_to_quality.py --jobs 2; then "
                                        "python benchmarks/time_to_quality.py --merge")
    # the new model passes FFJORD's 600-s KL (0.0014) at 60 s: ten times sooner
    assert merged["verdicts"]["8gaussians"]["best_time_to_ffjord_quality"] == 60.0
    assert "cfm-avg-fourier-60s" in (results / "time_to_quality.md").read_text()
    # the dataset's figure needs every cell's grid; the new method gets one of its own
    assert not (results / "time_to_quality_8gaussians.png").exists()
    assert (results / "time_to_quality_densities_cfm-avg-fourier-60s.png").is_file()
    # merging again replaces the cell run here rather than adding a second one
    ttq.main(["--table-only", "--merge", "--runs", str(runs), "--results", str(results)])
    again = json.loads((results / "time_to_quality.json").read_text())
    assert len(again["cells"]) == len(merged["cells"])


def test_merge_needs_published_results(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        ttq.main(["--table-only", "--merge", "--results", str(tmp_path)])
    assert stop.value.code == 2
    assert "--merge needs the results of an earlier run" in capsys.readouterr().err


def _replicate(method: str, name: str, seed: int, kl: float, budget: float = 60.0) -> dict:
    return {"method": method, "dataset": name, "seed": seed, "budget": budget, "step": 100 * seed,
            "gap_nats": kl, "nll_se": 0.007, "kl_nats": kl, "kl_se": 0.0005}


def _replicated_cells():
    """8gaussians with three runs of ffjord and of the averaged target (seed 0: the cells),
    two of the weight-averaged variant and three of a 600-s method."""
    cells = _cells()
    cells[("8gaussians", "cfm-avg-fourier-60s")] = _cell(
        "cfm-avg-fourier-60s", "8gaussians", {30.0: 0.01, 60.0: 0.0016}, at=(60.0,))
    cells[("8gaussians", "cfm-avg-fourier-ema-60s")] = _cell(
        "cfm-avg-fourier-ema-60s", "8gaussians", {60.0: 0.0010}, at=(60.0,))
    cells[("8gaussians", "ot-cfm")] = _cell("ot-cfm", "8gaussians", {600.0: 0.0001})
    replicates = {
        ("8gaussians", "ffjord"): {1: _replicate("ffjord", "8gaussians", 1, 0.0020, 600.0),
                                   2: _replicate("ffjord", "8gaussians", 2, 0.0015, 600.0)},
        ("8gaussians", "cfm-avg-fourier-60s"): {
            1: _replicate("cfm-avg-fourier-60s", "8gaussians", 1, 0.0018),
            2: _replicate("cfm-avg-fourier-60s", "8gaussians", 2, 0.0013)},
        ("8gaussians", "cfm-avg-fourier-ema-60s"): {
            1: _replicate("cfm-avg-fourier-ema-60s", "8gaussians", 1, 0.0009)},
        ("8gaussians", "ot-cfm"): {1: _replicate("ot-cfm", "8gaussians", 1, 0.0001, 600.0),
                                   2: _replicate("ot-cfm", "8gaussians", 2, 0.0001, 600.0)},
    }
    return cells, replicates


def test_replicates_compare_means_over_training_runs():
    cells, replicates = _replicated_cells()
    _, verdicts = ttq.summarize(cells, BUDGETS, replicates)
    gauss = verdicts["8gaussians"]
    # one run each: the averaged target's 0.0016 misses FFJORD's 0.0014 (the weight-averaged
    # variant's 0.0010 reaches it) ...
    assert gauss["ffjord_kl"] == 0.0014 and gauss["best_time_to_ffjord_quality"] == 60.0
    replicated = gauss["replicated"]
    ffjord = replicated["ffjord"]
    assert ffjord["kls"] == [0.0014, 0.0020, 0.0015] and ffjord["runs"] == 3
    assert ffjord["mean"] == pytest.approx(0.0049 / 3)
    assert ffjord["se"] == pytest.approx(statistics.stdev([0.0014, 0.0020, 0.0015]) / 3 ** 0.5)
    # only methods trained for a tenth of FFJORD's budget, with three runs or more, count:
    # not the 600-s ot-cfm, not the weight-averaged variant with two runs
    assert set(replicated["methods"]) == {"cfm-avg-fourier-60s"}
    mine = replicated["methods"]["cfm-avg-fourier-60s"]
    assert mine["kls"] == [0.0016, 0.0018, 0.0013]
    assert mine["diff"] == pytest.approx(0.0047 / 3 - 0.0049 / 3)
    assert mine["diff_se"] == pytest.approx((mine["se"] ** 2 + ffjord["se"] ** 2) ** 0.5)
    assert mine["reaches"] is True and replicated["best"] == "cfm-avg-fourier-60s"
    line = ttq.verdict_line("8gaussians", gauss, 600.0)
    assert ("over training runs, FFJORD's 600-s KL averages 0.0016 ± 0.0002 (3 runs) and "
            "cfm-avg-fourier-60s's 0.0016 ± 0.0001 (3 runs): reached on average (difference "
            "-0.0001 ± 0.0002)") in line
    # a worse third run turns the mean against it, whatever seed 0 says
    replicates[("8gaussians", "cfm-avg-fourier-60s")][2]["kl_nats"] = 0.0030
    _, verdicts = ttq.summarize(cells, BUDGETS, replicates)
    assert verdicts["8gaussians"]["replicated"]["methods"]["cfm-avg-fourier-60s"][
        "reaches"] is False
    assert "not reached on average" in ttq.verdict_line("8gaussians", verdicts["8gaussians"],
                                                        600.0)


def test_without_enough_runs_there_is_no_mean_verdict():
    cells, replicates = _replicated_cells()
    del replicates[("8gaussians", "ffjord")][2]
    _, verdicts = ttq.summarize(cells, BUDGETS, replicates)
    assert verdicts["8gaussians"]["replicated"] is None
    assert "over training runs" not in ttq.verdict_line("8gaussians", verdicts["8gaussians"],
                                                        600.0)
    _, verdicts = ttq.summarize(cells, BUDGETS)
    assert verdicts["8gaussians"]["replicated"] is None


def test_replicates_are_kept_by_merge_and_listed(tmp_path):
    results, runs = tmp_path / "results", tmp_path / "runs"
    results.mkdir()
    cells, replicates = _replicated_cells()
    published = [{**c, "budget": 600.0, "entropy": 2.83} for (name, _), c in cells.items()
                 if name == "8gaussians"]
    (results / "time_to_quality.json").write_text(json.dumps(
        {"command": "python benchmarks/time_to_quality.py --jobs 2", "verdicts": {},
         "cells": published, "replicates": [
             replicates[("8gaussians", "ffjord")][1],
             replicates[("8gaussians", "cfm-avg-fourier-60s")][1]]}))
    for method, kl in (("ffjord", 0.0015), ("cfm-avg-fourier-60s", 0.0013)):
        folder = ttq.replicate_folder(runs, "8gaussians", method, 2)
        assert folder == runs / "8gaussians" / "seed-2" / method
        folder.mkdir(parents=True)
        (folder / ttq.CELL).write_text(json.dumps(
            _replicate(method, "8gaussians", 2, kl, 600.0 if method == "ffjord" else 60.0)))
    ttq.main(["--table-only", "--merge", "--runs", str(runs), "--results", str(results)])
    merged = json.loads((results / "time_to_quality.json").read_text())
    assert {(r["method"], r["seed"]) for r in merged["replicates"]} == {
        ("ffjord", 1), ("ffjord", 2), ("cfm-avg-fourier-60s", 1), ("cfm-avg-fourier-60s", 2)}
    assert merged["verdicts"]["8gaussians"]["replicated"]["best"] == "cfm-avg-fourier-60s"
    text = (results / "time_to_quality.md").read_text()
    assert "## Training runs" in text
    assert ("| 8gaussians | ffjord | 0: 0.0014 (6000 steps), 1: 0.0020 (100 steps), "
            "2: 0.0015 (200 steps) | 0.0016 ± 0.0002 |") in text
    # the replicate cells under runs are not table cells of their own
    assert len(merged["cells"]) == len(published)


def test_a_replicate_trains_with_its_seed_and_evaluates_the_final_model(tmp_path, monkeypatch):
    calls = {}

    def train(name, options, seconds, out, snapshot_at, seed=0):
        calls.update(name=name, options=options, seconds=seconds, snapshot_at=snapshot_at,
                     seed=seed)
        (out / "snapshots").mkdir(parents=True)
        (out / "snapshots" / "snapshots.json").write_text(json.dumps(
            [{"file": "t60.pt", "at": 60.0, "seconds": 60.0, "step": 3900}]))

    def evaluate(run, snapshot, points, dataset, full):
        calls.update(snapshot=snapshot, n=len(points), full=full)
        return {"gap_nats": 0.002, "nll_se": 0.007, "kl_nats": 0.0017, "kl_se": 0.0005,
                "seconds": 1.0}

    monkeypatch.setattr(ttq, "_train_flowlab", train)
    monkeypatch.setattr(ttq, "_evaluate_flowlab", evaluate)
    run = ttq.replicate_folder(tmp_path, "8gaussians", "cfm-avg-fourier-60s", 3)
    ttq.run_replicate("cfm-avg-fourier-60s", "8gaussians", 600.0, run, 3)
    assert calls == {"name": "8gaussians", "options": ttq.METHODS["cfm-avg-fourier-60s"],
                     "seconds": 60.0, "snapshot_at": [60.0], "seed": 3, "snapshot": "t60.pt",
                     "n": ttq.N_TEST, "full": True}
    written = json.loads((run / ttq.CELL).read_text())
    assert written == _replicate("cfm-avg-fourier-60s", "8gaussians", 3, 0.0017) | {
        "step": 3900, "gap_nats": 0.002}
    assert ttq.load_replicates(tmp_path)[("8gaussians", "cfm-avg-fourier-60s")][3] == written


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,1", "--methods", "zuko"], "not zuko"),
    (["--seeds", "0,1", "--methods", "ffjord,ot-cfm-ml"], "not ot-cfm-ml"),
    (["--seeds", "one"], "--seeds takes whole numbers"),
    (["--seeds=-1,0"], "--seeds takes seeds 0 or more"),
])
def test_bad_seeds_are_refused_before_any_training(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        ttq.main([*argv, "--runs", str(tmp_path / "runs"), "--results", str(tmp_path)])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
