import importlib.util
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from benchload import load_benchmark

df = load_benchmark("discrete_flows.py", "discrete_flows_under_test")
H = 2.5  # a made-up entropy for the fake cells


def fake_cell(method, dataset, gap, kl_se=0.002, steps=100, train_seconds=10.0,
              eval_seconds=2.0, sample_seconds=0.5, parameters=1000, seed=0):
    evaluation = {"entropy_nats": H, "nll_nats": H + gap, "nll_se": 0.005, "gap_nats": gap,
                  "kl_nats": gap + 0.001, "kl_se": kl_se, "n_test": 20_000,
                  "seconds": eval_seconds, "dtype": "float64", "nfe": None}
    measured = {"parameters": parameters, "train_steps": steps, "train_seconds": train_seconds,
                "batch_size": 512, "sample_n": 10_000, "sample_seconds": sample_seconds,
                "sample_seconds_all": [sample_seconds] * 3, "samples_finite": True,
                "versions": {"torch": "test"}}
    return df.make_cell(method, dataset, 300.0, evaluation, measured, wall=400.0, jobs=2,
                        seed=seed)


def write_cells(runs: Path, cells: list[dict]) -> None:
    for cell in cells:
        folder = df.cell_folder(runs, cell["dataset"], cell["method"], cell.get("seed", 0))
        folder.mkdir(parents=True)
        (folder / df.CELL).write_text(json.dumps(cell))


@pytest.fixture
def runs(tmp_path):
    cells = [
        fake_cell("nsf-coupling", "8gaussians", 0.03), fake_cell("nsf-coupling", "moons", 0.04),
        fake_cell("nsf-coupling", "circles", 0.045),
        fake_cell("nsf-coupling", "checkerboard", 0.09),
        fake_cell("nsf-ar", "8gaussians", 0.02), fake_cell("nsf-ar", "moons", 0.07),
        fake_cell("nsf-ar", "circles", 0.01), fake_cell("nsf-ar", "checkerboard", 0.08),
        fake_cell("realnvp", "8gaussians", 0.10), fake_cell("realnvp", "moons", 0.12),
        fake_cell("glow", "8gaussians", 0.14),  # glow on moons: not run
        fake_cell("maf", "moons", 0.050, steps=200, eval_seconds=4.0, parameters=23060),
        fake_cell("maf", "8gaussians", 0.010, steps=300, eval_seconds=1.0, parameters=23060),
        fake_cell("zuko-maf", "moons", 0.048),  # within noise of maf: maf no worse
        fake_cell("nflows-maf", "moons", 0.030),  # clearly better than maf
        df.error_cell("zuko-nsf", "moons", 300.0, "step 7: the training loss is nan",
                      wall=5.0, jobs=2),
    ]
    write_cells(tmp_path / "runs", cells)
    return tmp_path / "runs"


def test_make_cell_throughputs():
    cell = fake_cell("maf", "moons", 0.05, steps=100, train_seconds=10.0, eval_seconds=2.0,
                     sample_seconds=0.5)
    assert cell["train_samples_per_s"] == pytest.approx(100 * 512 / 10.0)
    assert cell["eval_points_per_s"] == pytest.approx(20_000 / 2.0)
    assert cell["sample_per_s"] == pytest.approx(10_000 / 0.5)
    assert cell["kind"] == "flowlab" and fake_cell("zuko-nsf", "moons", 0.1)["kind"] == "peer"
    assert cell["error"] is None and cell["entropy"] == H and cell["jobs"] == 2


def test_verdicts_from_fake_cells(runs):
    cells = df.load_cells(runs)
    assert len(cells) == 16
    results = {v["target"]: v for v in df.verdicts(cells)}
    spline_easy = results["nsf-coupling and nsf-ar within 0.05 nats of H on 8gaussians, moons, "
                          "circles"]
    assert spline_easy["status"] == "fail"
    failing = [(i["dataset"], i["method"]) for i in spline_easy["items"] if not i["pass"]]
    assert failing == [("moons", "nsf-ar")]
    assert results["nsf-coupling and nsf-ar within 0.10 nats of H on checkerboard"]["status"] \
        == "pass"
    coupling = results["realnvp and glow within 0.15 nats of H on 8gaussians, moons"]
    assert coupling["status"] == "incomplete"  # glow on moons is missing, nothing fails
    assert [i["pass"] for i in coupling["items"]] == [True, True, True, None]
    maf = results["flowlab maf no worse than zuko-maf and nflows-maf"]
    assert maf["status"] == "fail"
    by_peer = {i["peer"]: i for i in maf["items"]}
    assert set(by_peer) == {"zuko-maf", "nflows-maf"}  # only moons has peers
    assert by_peer["zuko-maf"]["pass"] is True
    assert by_peer["zuko-maf"]["diff"] == pytest.approx(0.002)
    assert by_peer["zuko-maf"]["diff_se"] == pytest.approx(0.002 * 2 ** 0.5)
    assert by_peer["nflows-maf"]["pass"] is False
    splines = results["flowlab nsf-coupling and nsf-ar no worse than zuko-nsf and nflows-nsf"]
    assert splines["status"] == "pass"  # the only peer cell failed: flowlab's flows are better
    assert all("peer failed" in i["note"] for i in splines["items"])


def test_tables_from_fake_cells(runs):
    cells = df.load_cells(runs)
    gaps = df.gap_table(cells).splitlines()
    assert gaps[0] == "| method | 8gaussians | checkerboard | circles | moons |"
    assert "| nsf-ar | +0.020 | +0.080 | +0.010 | +0.070 |" in gaps
    assert "| glow | +0.140 | - | - | - |" in gaps
    assert "| zuko-nsf | - | - | - | failed |" in gaps
    methods = [line.split(" | ")[0].strip("| ") for line in gaps[2:]]
    assert methods == ["realnvp", "glow", "maf", "nsf-coupling", "nsf-ar", "zuko-maf",
                       "zuko-nsf", "nflows-maf"]  # the benchmark's order, not the files'
    speed = df.throughput_table(cells)
    # maf: medians over 8gaussians and moons (300 and 200 steps of 512 in 10 s; 20,000 points
    # in 1 s and in 4 s)
    assert "| maf | 23,060 | 2 | 12,800 (10,200–15,400) | 12,500 (5,000–20,000) " \
           "| 20,000 (20,000–20,000) |" in speed
    assert "| zuko-nsf | - | 0 | - | - | - |" in speed
    per_dataset = df.dataset_tables(cells)
    assert f"### moons (H = {H:.4f} nats)" in per_dataset
    assert "| nsf-ar | 1,000 | 100 | 2.5700 ± 0.0050 | +0.0700 | 0.0710 ± 0.0020 " in per_dataset
    assert "| zuko-nsf | failed: step 7: the training loss is nan |" in per_dataset


def test_table_only_writes_report_json_and_figure(runs, tmp_path):
    results = tmp_path / "results"
    df.main(["--table-only", "--runs", str(runs), "--results", str(results)])
    text = (results / "discrete_flows.md").read_text()
    assert text.startswith("# Discrete flows")
    assert f"Command: `python benchmarks/discrete_flows.py --runs {runs} --results {results}`" \
        in text
    assert "2 cell(s) at a time" in text and "Budget: 300 s" in text
    assert "- **FAIL**: nsf-coupling and nsf-ar within 0.05 nats of H" in text
    assert "moons, nsf-ar: gap +0.0700 ± 0.0050 nats (limit 0.05; **fail**)" in text
    assert "- **INCOMPLETE**: realnvp and glow" in text
    assert "moons, glow: not run yet" in text
    assert "moons, maf vs nflows-maf: gap +0.0500 vs +0.0300 nats, difference +0.0200" in text
    saved = json.loads((results / "discrete_flows.json").read_text())
    assert len(saved["cells"]) == 16
    assert [v["status"] for v in saved["verdicts"]] == ["fail", "pass", "incomplete", "fail",
                                                        "pass"]
    assert (results / "discrete_flows.png").stat().st_size > 1000


def test_tiny_cells_end_to_end(tmp_path):
    """One flowlab family and one peer, 1 s of training each, two at a time."""
    peer = "nflows-maf" if importlib.util.find_spec("nflows") else "zuko-maf"
    pytest.importorskip(peer.split("-")[0])
    runs = tmp_path / "runs"
    with ThreadPoolExecutor(2) as pool:
        cells = list(pool.map(lambda m: df.run_cell(m, "moons", 1.0, runs, 2), ["maf", peer]))
    for cell in cells:
        assert cell["error"] is None, cell["error"]
        assert cell["n_test"] == 20_000 and cell["eval_dtype"] == "float64"
        assert cell["parameters"] == 23_060  # the peer is sized like flowlab's maf
        assert cell["train_steps"] > 0 and cell["train_seconds"] >= 1.0
        assert cell["train_samples_per_s"] == pytest.approx(
            cell["train_steps"] * 512 / cell["train_seconds"])
        assert cell["sample_per_s"] > 0 and cell["samples_finite"]
        assert abs(cell["gap_nats"] - (cell["nll_nats"] - cell["entropy"])) < 1e-12
        # better than the untrained flow, N(0, I), whose gap on moons is 1.49 nats (a second
        # of wall clock is few steps on a loaded machine, so no tighter bound)
        assert cell["gap_nats"] < 1.45
        saved = json.loads((runs / "moons" / cell["method"] / df.CELL).read_text())
        assert saved == json.loads(json.dumps(cell))
    assert set(df.load_cells(runs)) == {("moons", "maf"), ("moons", peer)}


def test_a_failing_step_gives_a_failed_cell(tmp_path, monkeypatch):
    py = sys.executable
    monkeypatch.setattr(df, "cell_commands", lambda method, name, seconds, cell_dir, seed: [
        [py, "-c", "print('starting')"],
        [py, "-c", "import sys; print('step 3: the training loss is nan', file=sys.stderr); "
                   "sys.exit(2)"],
        [py, "-c", "raise SystemExit('never run')"],
    ])
    cell = df.run_cell("maf", "moons", 1.0, tmp_path, 1)
    assert cell["error"].endswith("step 3: the training loss is nan")
    assert json.loads((tmp_path / "moons" / "maf" / df.CELL).read_text())["error"] == \
        cell["error"]
    monkeypatch.setattr(df, "cell_commands", lambda *a: [[py, "-c", "import os, signal; "
                                                              "os.kill(os.getpid(), 9)"]])
    with pytest.raises(SystemExit, match="exit code -9"):
        df.run_cell("maf", "moons", 1.0, tmp_path, 1)
    assert not (tmp_path / "moons" / "maf" / df.CELL).exists()  # to be run again


def test_training_seeds_decide_no_worse_by_their_scatter(tmp_path):
    """Seed 0 alone: maf trails zuko-maf by 0.004 nats with a paired s.e. of 0.0014, a fail.
    With three seeds each, the per-seed differences (+0.004, -0.003, +0.002) scatter far more
    than the test sample's noise, and their mean (+0.001 ± 0.0021) is no worse; a peer that is
    better at every seed (differences +0.010, +0.012, +0.011) still fails."""
    runs = tmp_path / "runs"
    first = [fake_cell("maf", "moons", 0.014, kl_se=0.001),
             fake_cell("zuko-maf", "moons", 0.010, kl_se=0.001),
             fake_cell("nflows-maf", "moons", 0.004, kl_se=0.001)]
    write_cells(runs, first)
    alone = {i["peer"]: i for i in df.peer_verdict(df.load_cells(runs), ("maf",),
                                                    ("zuko-maf", "nflows-maf"), ["moons"])["items"]}
    assert alone["zuko-maf"]["pass"] is False and "seeds" not in alone["zuko-maf"]
    write_cells(runs, [fake_cell("maf", "moons", 0.012, seed=1),
                       fake_cell("zuko-maf", "moons", 0.015, seed=1),
                       fake_cell("nflows-maf", "moons", 0.000, seed=1),
                       fake_cell("maf", "moons", 0.016, seed=2),
                       fake_cell("zuko-maf", "moons", 0.014, seed=2),
                       fake_cell("nflows-maf", "moons", 0.005, seed=2)])
    assert (runs / "moons" / "maf" / "seed-2" / df.CELL).is_file()
    cells = df.load_cells(runs)
    assert len(cells) == 3  # the tables show seed 0
    assert cells[("moons", "maf")]["seed_gaps"] == {0: 0.014, 1: 0.012, 2: 0.016}
    verdict = df.peer_verdict(cells, ("maf",), ("zuko-maf", "nflows-maf"), ["moons"])
    items = {i["peer"]: i for i in verdict["items"]}
    zuko = items["zuko-maf"]
    assert zuko["seeds"] == 3 and zuko["pass"] is True
    assert zuko["diff"] == pytest.approx(0.001)
    assert zuko["diff_se"] == pytest.approx(0.0036056 / 3 ** 0.5, rel=1e-4)
    assert zuko["gap"] == pytest.approx(0.014) and zuko["peer_gap"] == pytest.approx(0.013)
    assert items["nflows-maf"]["pass"] is False and items["nflows-maf"]["diff"] == \
        pytest.approx(0.011)
    assert verdict["status"] == "fail"
    text = df._verdict_item_text(zuko)
    assert text.startswith("moons, maf vs zuko-maf, mean of 3 training seeds: gap +0.0140 vs "
                           "+0.0130 nats, difference +0.0010 ± 0.0021 (s.e. over seeds; pass)")
    section = "\n".join(df.seeds_section(cells))
    assert "| moons | maf | 0, 1, 2 | +0.0140, +0.0120, +0.0160 | +0.0140 ± 0.0012 | 0.0020 |" \
        in section
    assert df.seeds_section(df.load_cells(tmp_path / "none")) == []


def test_a_seed_cell_trains_with_its_seed(tmp_path):
    cell_dir = df.cell_folder(tmp_path, "moons", "maf", 2)
    assert cell_dir == tmp_path / "moons" / "maf" / "seed-2"
    train = df.cell_commands("maf", "moons", 5.0, cell_dir, 2)[0]
    assert train[-2:] == ["--seed", "2"] and str(cell_dir / df.RUN) in train
    peer = df.cell_commands("zuko-maf", "moons", 5.0, cell_dir, 2)[0]
    assert peer[-2:] == ["--seed", "2"]
    assert "--seed" not in df.cell_commands("maf", "moons", 5.0, tmp_path, 0)[0]
    with pytest.raises(SystemExit):
        df.main(["--seeds", "a,b", "--runs", str(tmp_path)])


def test_merge_keeps_the_published_cells_and_replaces_rerun_ones(runs, tmp_path):
    """A fresh clone has the results json but no runs folder: --merge reruns some cells and
    keeps the rest. A rerun seed-0 cell drops the published seeds of the old one; seeds run
    for a cell that was not rerun join its published seeds."""
    results = tmp_path / "results"
    write_cells(runs, [fake_cell("maf", "moons", 0.052, seed=1),
                       fake_cell("maf", "moons", 0.054, seed=2),
                       fake_cell("nflows-maf", "moons", 0.031, seed=1)])
    df.main(["--table-only", "--runs", str(runs), "--results", str(results)])
    fresh = tmp_path / "fresh"
    with pytest.raises(SystemExit) as refused:  # nothing published in an empty results folder
        df.main(["--table-only", "--merge", "--runs", str(fresh), "--results",
                 str(tmp_path / "empty")])
    assert refused.value.code == 2  # the parser's error, before anything runs
    write_cells(fresh, [fake_cell("maf", "moons", 0.030),  # rerun: replaces 0.050 and seeds
                        fake_cell("nflows-maf", "moons", 0.033, seed=2),
                        fake_cell("radial", "moons", 0.4)])  # a new cell
    df.main(["--table-only", "--merge", "--runs", str(fresh), "--results", str(results)])
    saved = json.loads((results / "discrete_flows.json").read_text())
    cells = {(c["dataset"], c["method"]): c for c in saved["cells"]}
    assert len(cells) == 17
    assert cells[("moons", "maf")]["gap_nats"] == 0.030
    assert cells[("moons", "maf")]["seed_gaps"] == {"0": 0.030}
    assert cells[("moons", "nflows-maf")]["seed_gaps"] == {"0": 0.030, "1": 0.031, "2": 0.033}
    assert cells[("8gaussians", "nsf-ar")]["gap_nats"] == 0.02  # kept from the published run
    assert cells[("moons", "zuko-nsf")]["error"].endswith("the training loss is nan")
    assert saved["command"] == (f"python benchmarks/discrete_flows.py --runs {runs} --results "
                                f"{results}; then python benchmarks/discrete_flows.py --merge "
                                f"--runs {fresh} --results {results}")
