"""The time-to-quality benchmark's table and verdicts, from made-up cells (no training)."""

import json

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
