"""Every discrete flow of flowlab on the eight 2-D densities at one fixed budget, beside a CNF
and the same-named flows of zuko and nflows.

What: for each dataset and method (a cell), the test NLL +- s.e. in nats, the gap NLL - H to
the true entropy, the paired KL(data || model) +- s.e., the number of parameters, the training
steps and throughputs: training (samples per second of training clock, steps x batch /
seconds), evaluation (test points per second for the exact log-density of the 20,000 held-out
points in float64) and sampling (samples per second for 10,000 samples in float32, median of 3).

Methods:

- flowlab's discrete flows, every family with the defaults of ``flowlab train --model F``:
  ``planar``, ``radial``, ``nice``, ``realnvp``, ``glow``, ``maf``, ``iaf``, ``nsf-coupling``,
  ``nsf-ar``;
- ``ot-cfm``, the CNF reference row: ``flowlab train --model cfm --coupling ot`` (flow
  matching with minibatch OT pairs, exact likelihood by the ODE at evaluation);
- peers (``benchmarks/peers/flow_peers.py``, optional dependencies zuko and nflows):
  ``zuko-maf``, ``zuko-nsf``, ``nflows-maf``, ``nflows-nsf``, sized like flowlab's ``maf`` and
  ``nsf-ar``.

How: flowlab's methods go through the command line as a user would run them, one subprocess
each: ``flowlab train --data D --model F --seconds S --out RUN --force --no-progress --threads
1``, then ``flowlab eval RUN --threads 1`` (20,000 fresh points with the fixed test seed,
float64). A peer trains on the same data stream (seed 0), with the same AdamW, learning rate,
cosine schedule, batch size and training clock as flowlab's loop, and is evaluated by
flowlab's ``evaluate_nll`` on the same points in float64. A last subprocess per cell loads the
trained model, counts parameters and times sampling. All of a cell's processes use one torch
thread. A cell whose training or evaluation fails (e.g. NaN loss) is recorded as failed with
the error, and the benchmark goes on.

Usage (from the repository root, after ``pip install -e ".[bench]"``)::

    python benchmarks/discrete_flows.py --jobs 2                 # everything, 300 s per cell
    python benchmarks/discrete_flows.py --datasets moons --methods maf,zuko-maf --seconds 60
    python benchmarks/discrete_flows.py --datasets circles --methods nsf-coupling,zuko-nsf \
        --seeds 0,1,2                                            # three training seeds each
    python benchmarks/discrete_flows.py --table-only             # rebuild tables and figure
    python benchmarks/discrete_flows.py --datasets rings --methods maf --merge
        # rerun cells of the published table (a fresh clone has no runs folder) and keep the rest

Training seeds: ``--seeds 0,1,2`` trains each cell with each seed (the initialization and
the data stream; the test points stay the same). The tables show seed 0; the other seeds live
in ``runs/discrete/DATASET/METHOD/seed-S`` and serve the "no worse than a peer" verdict, where
the difference between two runs of one seed on one test sample says nothing of how much a
second training would differ (see :func:`peer_verdict`).

Finished cells (``runs/discrete/DATASET/METHOD/cell.json``) are kept and not rerun unless
``--force``, so the benchmark can be run in parts; the tables cover every finished cell under
``--runs``. ``--jobs 2`` runs two cells at a time, one thread each (on a 2-core machine each
keeps its own core; ``--jobs 1`` gives the most faithful throughputs). Writes
``benchmarks/results/discrete_flows.{md,json,png}``: a gap table (method x dataset), one table
per dataset, a throughput table, a verdict on each target of the project's issue 4 and a heat
map of the gaps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
DATASETS = ("8gaussians", "checkerboard", "2spirals", "pinwheel", "rings", "circles", "moons",
            "swissroll")
# flowlab methods: the `flowlab train` options that pick them
FLOWLAB = {
    "planar": ["--model", "planar"],
    "radial": ["--model", "radial"],
    "nice": ["--model", "nice"],
    "realnvp": ["--model", "realnvp"],
    "glow": ["--model", "glow"],
    "maf": ["--model", "maf"],
    "iaf": ["--model", "iaf"],
    "nsf-coupling": ["--model", "nsf-coupling"],
    "nsf-ar": ["--model", "nsf-ar"],
    "ot-cfm": ["--model", "cfm", "--coupling", "ot"],
}
PEERS = ("zuko-maf", "zuko-nsf", "nflows-maf", "nflows-nsf")
METHODS = (*FLOWLAB, *PEERS)
CELL, MEASURE, OUTPUT, RUN = "cell.json", "measure.json", "output.txt", "run"
N_SAMPLES, SAMPLE_REPEATS = 10_000, 3
RESULTS_STEM = "discrete_flows"

# The targets of issue 4: (methods, datasets, largest gap NLL - H in nats).
GAP_TARGETS = (
    (("nsf-coupling", "nsf-ar"), ("8gaussians", "moons", "circles"), 0.05),
    (("nsf-coupling", "nsf-ar"), ("checkerboard",), 0.10),
    (("realnvp", "glow"), ("8gaussians", "moons"), 0.15),
)
# flowlab flows that must be no worse than the peers of the same name
PEER_TARGETS = (
    (("maf",), ("zuko-maf", "nflows-maf")),
    (("nsf-coupling", "nsf-ar"), ("zuko-nsf", "nflows-nsf")),
)
NO_WORSE_SIGMAS = 2.0
MIN_SEEDS = 3  # training seeds both sides need before the verdict uses the seed-to-seed scatter


# -- one cell ----------------------------------------------------------------------------------
def cell_folder(runs: Path, name: str, method: str, seed: int = 0) -> Path:
    """Where a cell lives: seed 0 (the one the tables show) in ``RUNS/NAME/METHOD``, another
    training seed S in ``RUNS/NAME/METHOD/seed-S``."""
    base = Path(runs) / name / method
    return base if seed == 0 else base / f"seed-{seed}"


def cell_commands(method: str, name: str, seconds: float, cell_dir: Path,
                  seed: int = 0) -> list[list[str]]:
    """The subprocesses of one cell, in order: train (+ eval), then the measurement."""
    run = cell_dir / RUN
    py = sys.executable
    seeding = ["--seed", str(seed)] if seed else []
    if method in FLOWLAB:
        steps = [
            [py, "-m", "flowlab.cli", "train", "--data", name, *FLOWLAB[method], "--seconds",
             str(seconds), "--out", str(run), "--force", "--no-progress", "--threads", "1",
             *seeding],
            [py, "-m", "flowlab.cli", "eval", str(run), "--threads", "1"],
        ]
    elif method in PEERS:
        steps = [[py, str(ROOT / "peers" / "flow_peers.py"), "--flow", method, "--data", name,
                  "--seconds", str(seconds), "--out", str(run), "--force", "--threads", "1",
                  *seeding]]
    else:
        raise ValueError(f"unknown method {method!r}")
    return steps + [[py, str(Path(__file__).resolve()), "--measure", method, str(cell_dir)]]


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for k in range(repeats):
        start = time.perf_counter()
        fn(k)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def measure(method: str, cell_dir: Path) -> dict[str, Any]:
    """Parameters, training steps and clock, and sampling time of a trained cell (one thread).

    Sampling draws ``N_SAMPLES`` points in float32 (the training dtype), ``SAMPLE_REPEATS``
    times with seeds 0, 1, 2; the median wall time is kept.
    """
    import torch

    torch.set_num_threads(1)
    run = cell_dir / RUN
    if method in PEERS:
        sys.path.insert(0, str(ROOT))
        from peers import flow_peers

        model = flow_peers.load_peer(run)
        steps, seconds = flow_peers.final_step(run)
        config = json.loads((run / flow_peers.CONFIG).read_text())
        versions = {method.split("-")[0]: config["library_version"]}
    else:
        from flowlab.train import load_run
        from flowlab.train.checkpoint import list_checkpoints, load_tensors

        model, config = load_run(run)
        _, meta = load_tensors(list_checkpoints(run)[0])  # the final checkpoint
        steps, seconds = int(meta["step"]), float(meta["seconds"])
        versions = {"flowlab": config.get("flowlab_version")}
    model = model.float().eval()
    finite = []

    def draw(seed: int) -> None:
        torch.manual_seed(seed)
        x = model.sample((N_SAMPLES,))
        finite.append(bool(torch.isfinite(x).all()))

    median, times = _median_time(draw, SAMPLE_REPEATS)
    return {
        "parameters": model.num_parameters(), "train_steps": steps, "train_seconds": seconds,
        "batch_size": int(config["train"]["batch_size"]), "sample_n": N_SAMPLES,
        "sample_seconds": median, "sample_seconds_all": times, "samples_finite": all(finite),
        "versions": {**versions, "torch": torch.__version__},
    }


def machine_line() -> str:
    return (f"{platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}")


def make_cell(method: str, name: str, budget: float, evaluation: dict, measured: dict,
              wall: float, jobs: int, seed: int = 0) -> dict[str, Any]:
    """The record of a finished cell from its evaluation (eval.json) and measurement."""
    cell = {
        "method": method, "dataset": name, "kind": "peer" if method in PEERS else "flowlab",
        "seed": seed, "budget": budget, "error": None, "entropy": evaluation["entropy_nats"],
        **{k: evaluation[k] for k in ("nll_nats", "nll_se", "gap_nats", "kl_nats", "kl_se",
                                      "n_test")},
        "eval_seconds": evaluation["seconds"], "eval_dtype": evaluation.get("dtype", "float64"),
        "nfe_eval": evaluation.get("nfe"), **measured, "wall_seconds": wall, "jobs": jobs,
        "machine": machine_line(),
    }
    cell["train_samples_per_s"] = (cell["train_steps"] * cell["batch_size"]
                                   / cell["train_seconds"]) if cell["train_seconds"] else None
    cell["eval_points_per_s"] = cell["n_test"] / cell["eval_seconds"]
    cell["sample_per_s"] = cell["sample_n"] / cell["sample_seconds"]
    return cell


def error_cell(method: str, name: str, budget: float, error: str, wall: float,
               jobs: int, seed: int = 0) -> dict[str, Any]:
    return {"method": method, "dataset": name, "kind": "peer" if method in PEERS else "flowlab",
            "seed": seed, "budget": budget, "error": error, "wall_seconds": wall, "jobs": jobs,
            "machine": machine_line()}


def _tail(path: Path, lines: int = 3) -> str:
    text = [t for t in path.read_text(errors="replace").splitlines() if t.strip()]
    return " / ".join(text[-lines:])


def published_results(parser: argparse.ArgumentParser, path: Path, merge: bool) -> dict | None:
    """With ``--merge``, the results json an earlier run wrote at ``path`` (the published table
    of a fresh clone), or the parser's error if there is none; without it, None."""
    if not merge:
        return None
    if not path.is_file():
        parser.error(f"--merge needs the results of an earlier run in {path}; "
                     f"run without --merge to start a new table")
    return json.loads(path.read_text())


def chained_command(published: dict | None, command: str) -> str:
    """The command that made a table: this one, after the published run's when merging."""
    command = command.strip()
    return f"{published['command']}; then {command}" if published else command


def run_steps(commands: list[list[str]], output: Path, what: str) -> str | None:
    """Run a cell's subprocesses in order, their output into ``output``.

    A step that fails with an error of its own (exit code 1 or 2: an exception, a NaN loss, a
    flowlab error) ends the cell: the last lines of its output are returned. Any other exit (a
    signal) stops the benchmark and leaves the cell to be run again. None: every step ran.
    """
    import flowlab

    # the subprocesses import the flowlab this process imported, wherever it came from
    source = str(Path(flowlab.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (source, os.environ.get("PYTHONPATH")) if p)}
    with open(output, "w") as out:
        for argv in commands:
            out.write(f"$ {shlex.join(argv)}\n")
            out.flush()
            code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT,
                                  env=env).returncode
            if code in (1, 2):
                out.flush()
                return _tail(output)
            if code != 0:
                raise SystemExit(f"{what}: {argv[1:4]} ended with exit code {code}")
    return None


def run_cell(method: str, name: str, seconds: float, runs: Path, jobs: int,
             seed: int = 0) -> dict[str, Any]:
    """Train, evaluate and measure one cell in subprocesses (:func:`run_steps`); write and
    return its cell.json (a failed cell holds the error)."""
    from flowlab.train.checkpoint import atomic_write_json

    cell_dir = cell_folder(runs, name, method, seed)
    what = f"{method} on {name}" + (f" (seed {seed})" if seed else "")
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / CELL).unlink(missing_ok=True)
    (cell_dir / MEASURE).unlink(missing_ok=True)
    start = time.perf_counter()
    error = run_steps(cell_commands(method, name, seconds, cell_dir, seed), cell_dir / OUTPUT,
                      what)
    label = f"{name:>12} {method:>12}" + (f" seed {seed}" if seed else "")
    if error is not None:
        cell = error_cell(method, name, seconds, error, time.perf_counter() - start, jobs, seed)
        atomic_write_json(cell_dir / CELL, cell)
        print(f"{label}: FAILED ({cell['error']})", flush=True)
        return cell
    evaluation = json.loads((cell_dir / RUN / "eval.json").read_text())
    measured = json.loads((cell_dir / MEASURE).read_text())
    cell = make_cell(method, name, seconds, evaluation, measured, time.perf_counter() - start,
                     jobs, seed)
    atomic_write_json(cell_dir / CELL, cell)
    print(f"{label}: gap {cell['gap_nats']:+.4f} ± {cell['nll_se']:.4f} nats, "
          f"KL {cell['kl_nats']:.4f} ± {cell['kl_se']:.4f}, {cell['train_steps']} steps, "
          f"{cell['parameters']:,} parameters", flush=True)
    return cell


def load_cells(runs: Path, published: list[dict] | None = None) -> dict[tuple[str, str], dict]:
    """The seed-0 cells by (dataset, method); each finished one carries ``seed_gaps``, the gap
    of every finished training seed of that cell, seed 0 included.

    ``published``: the cells of a results json written before (``--merge``). They come first, with
    their seeds; a seed-0 cell finished under ``runs`` replaces the published one together
    with its seeds (a rerun cell may come from changed code, so the old seeds no longer
    belong to it), and seeds finished under ``runs`` join the cell they belong to.
    """
    cells = {}
    if published is not None:
        for cell in published:
            cell = dict(cell)
            if _ok(cell):
                cell["seed_gaps"] = {int(s): g for s, g in
                                     cell.get("seed_gaps", {0: cell["gap_nats"]}).items()}
            cells[(cell["dataset"], cell["method"])] = cell
    for path in sorted(Path(runs).glob(f"*/*/{CELL}")):
        cell = json.loads(path.read_text())
        cells[(cell["dataset"], cell["method"])] = cell
        if _ok(cell):
            cell["seed_gaps"] = {0: cell["gap_nats"]}
    for path in sorted(Path(runs).glob(f"*/*/seed-*/{CELL}")):
        other = json.loads(path.read_text())
        primary = cells.get((other["dataset"], other["method"]))
        if _ok(other) and _ok(primary):
            primary["seed_gaps"][int(other["seed"])] = other["gap_nats"]
    return cells


# -- verdicts ----------------------------------------------------------------------------------
def _ok(cell: dict | None) -> bool:
    return cell is not None and cell.get("error") is None


def _status(items: list[dict]) -> str:
    if any(i["pass"] is False for i in items):
        return "fail"
    if not items or any(i["pass"] is None for i in items):
        return "incomplete"
    return "pass"


def gap_verdict(cells: dict, methods: tuple[str, ...], names: tuple[str, ...],
                limit: float) -> dict[str, Any]:
    """Every method within ``limit`` nats of H (gap NLL - H, point estimate) on every dataset."""
    items = []
    for name in names:
        for method in methods:
            cell = cells.get((name, method))
            item = {"dataset": name, "method": method, "limit": limit}
            if cell is None:
                item.update(pass_=None, note="not run yet")
            elif not _ok(cell):
                item.update(pass_=False, note=f"failed: {cell['error']}")
            else:
                item.update(gap=cell["gap_nats"], se=cell["nll_se"],
                            pass_=cell["gap_nats"] <= limit)
            item["pass"] = item.pop("pass_")
            items.append(item)
    text = (f"{' and '.join(methods)} within {limit:.2f} nats of H on {', '.join(names)}")
    return {"target": text, "status": _status(items), "items": items}


def peer_verdict(cells: dict, ours: tuple[str, ...], peers: tuple[str, ...],
                 names: list[str]) -> dict[str, Any]:
    """Each flowlab flow no worse than each peer on every dataset where the peer ran.

    No worse: flowlab's gap exceeds the peer's by at most NO_WORSE_SIGMAS standard errors of
    the difference. Where both ran with the same MIN_SEEDS or more training seeds, the
    difference is the mean over those seeds of the per-seed differences (each seed trains both
    on the same data stream), and its s.e. the seed-to-seed scatter of that mean: this holds
    the randomness of training, the larger part at a fixed budget. Otherwise it is the
    difference of the seed-0 runs. Both are evaluated on the same points, so that difference
    of gaps is the difference of paired KLs; its s.e. is taken as sqrt(kl_se_1^2 + kl_se_2^2),
    which ignores their (positive) correlation over the shared points and so errs on the
    lenient side, yet it knows nothing of a second training, which can land further away.
    """
    items = []
    for name in names:
        for peer in peers:
            theirs = cells.get((name, peer))
            if theirs is None:
                continue  # the peer was not run here (not installed, or not chosen)
            for method in ours:
                mine = cells.get((name, method))
                item = {"dataset": name, "method": method, "peer": peer}
                if mine is None:
                    item.update(pass_=None, note="flowlab cell not run yet")
                elif not _ok(mine):
                    item.update(pass_=False, note=f"flowlab failed: {mine['error']}")
                elif not _ok(theirs):
                    item.update(gap=mine["gap_nats"], pass_=True,
                                note=f"peer failed: {theirs['error']}")
                else:
                    seeds = sorted(set(mine["seed_gaps"]) & set(theirs["seed_gaps"]))
                    if len(seeds) >= MIN_SEEDS:
                        mine_gaps = [mine["seed_gaps"][s] for s in seeds]
                        peer_gaps = [theirs["seed_gaps"][s] for s in seeds]
                        diffs = [a - b for a, b in zip(mine_gaps, peer_gaps, strict=True)]
                        diff = statistics.fmean(diffs)
                        se = statistics.stdev(diffs) / math.sqrt(len(seeds))
                        item.update(seeds=len(seeds), gap=statistics.fmean(mine_gaps),
                                    peer_gap=statistics.fmean(peer_gaps))
                    else:
                        diff = mine["gap_nats"] - theirs["gap_nats"]
                        se = math.hypot(mine["kl_se"], theirs["kl_se"])
                        item.update(gap=mine["gap_nats"], peer_gap=theirs["gap_nats"])
                    item.update(diff=diff, diff_se=se, pass_=diff <= NO_WORSE_SIGMAS * se)
                item["pass"] = item.pop("pass_")
                items.append(item)
    text = f"flowlab {' and '.join(ours)} no worse than {' and '.join(peers)}"
    return {"target": text, "status": _status(items), "items": items}


def verdicts(cells: dict) -> list[dict[str, Any]]:
    names = [n for n in DATASETS if any((n, m) in cells for m in METHODS)]
    out = [gap_verdict(cells, m, d, limit) for m, d, limit in GAP_TARGETS]
    out += [peer_verdict(cells, ours, peers, names) for ours, peers in PEER_TARGETS]
    return out


def _verdict_item_text(item: dict) -> str:
    where = f"{item['dataset']}, {item['method']}"
    mark = {True: "pass", False: "**fail**", None: "missing"}[item["pass"]]
    if "peer" in item:
        where += f" vs {item['peer']}"
        if "diff" in item and "seeds" in item:
            return (f"{where}, mean of {item['seeds']} training seeds: gap "
                    f"{item['gap']:+.4f} vs {item['peer_gap']:+.4f} nats, difference "
                    f"{item['diff']:+.4f} ± {item['diff_se']:.4f} (s.e. over seeds; {mark})")
        if "diff" in item:
            return (f"{where}: gap {item['gap']:+.4f} vs {item['peer_gap']:+.4f} nats, "
                    f"difference {item['diff']:+.4f} ± {item['diff_se']:.4f} ({mark})")
    elif "gap" in item:
        return (f"{where}: gap {item['gap']:+.4f} ± {item['se']:.4f} nats "
                f"(limit {item['limit']:.2f}; {mark})")
    if item["pass"] is None:
        return f"{where}: {item.get('note', 'not run')}"
    return f"{where}: {item.get('note', '')} ({mark})"


def verdict_text(results: list[dict]) -> str:
    lines = []
    for v in results:
        lines.append(f"- **{v['status'].upper()}**: {v['target']}")
        lines += [f"  - {_verdict_item_text(i)}" for i in v["items"]]
        if not v["items"]:
            lines.append("  - no cells for this target yet")
    return "\n".join(lines)


# -- tables ------------------------------------------------------------------------------------
def _order(cells: dict) -> tuple[list[str], list[str]]:
    names = [n for n in DATASETS if any((n, m) in cells for m in METHODS)]
    methods = [m for m in METHODS if any((n, m) in cells for n in DATASETS)]
    return names, methods


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _rate(value: float | None) -> str:
    """A throughput in samples per second to 3 significant figures: 141,000 or 52.3."""
    if value is None:
        return "-"
    rounded = float(f"{value:.3g}")
    return f"{rounded:,.0f}" if rounded >= 100 else f"{rounded:g}"


def gap_table(cells: dict) -> str:
    """Gap NLL - H in nats, one row per method, one column per dataset."""
    names, methods = _order(cells)
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for method in methods:
        row = []
        for name in names:
            cell = cells.get((name, method))
            row.append("-" if cell is None else "failed" if not _ok(cell)
                       else f"{cell['gap_nats']:+.3f}")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def dataset_tables(cells: dict) -> str:
    names, methods = _order(cells)
    parts = []
    for name in names:
        here = [cells[(name, m)] for m in methods if (name, m) in cells]
        entropy = next((c["entropy"] for c in here if _ok(c)), None)
        lines = [
            f"### {name}" + (f" (H = {entropy:.4f} nats)" if entropy is not None else ""),
            "",
            "| method | parameters | steps | test NLL ± s.e. | gap NLL − H | KL paired ± s.e. "
            "| train samples/s | eval points/s | sampling samples/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in here:
            if not _ok(c):
                error = str(c["error"]).replace("|", "/")
                lines.append(f"| {c['method']} | failed: {error} " + "| - " * 7 + "|")
                continue
            lines.append(
                f"| {c['method']} | {c['parameters']:,} | {c['train_steps']:,} "
                f"| {c['nll_nats']:.4f} ± {c['nll_se']:.4f} | {c['gap_nats']:+.4f} "
                f"| {c['kl_nats']:.4f} ± {c['kl_se']:.4f} | {_rate(c['train_samples_per_s'])} "
                f"| {_rate(c['eval_points_per_s'])} | {_rate(c['sample_per_s'])} |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def throughput_table(cells: dict) -> str:
    """Per method: parameters and the median (min-max) throughputs over its datasets."""
    _, methods = _order(cells)
    lines = ["| method | parameters | datasets | train samples/s | eval points/s "
             "| sampling samples/s |", "|---|---|---|---|---|---|"]

    def spread(values: list[float]) -> str:
        if not values:
            return "-"
        if len(values) == 1:
            return _rate(values[0])
        return (f"{_rate(statistics.median(values))} ({_rate(min(values))}–"
                f"{_rate(max(values))})")

    for method in methods:
        ok = [c for (n, m), c in cells.items() if m == method and _ok(c)]
        if not ok:
            lines.append(f"| {method} | - | 0 | - | - | - |")
            continue
        params = sorted({c["parameters"] for c in ok})
        lines.append(
            f"| {method} | {', '.join(f'{p:,}' for p in params)} | {len(ok)} "
            f"| {spread([c['train_samples_per_s'] for c in ok if c['train_samples_per_s']])} "
            f"| {spread([c['eval_points_per_s'] for c in ok])} "
            f"| {spread([c['sample_per_s'] for c in ok])} |"
        )
    return "\n".join(lines)


def seeds_section(cells: dict) -> list[str]:
    """A table of the gaps of every cell trained with more than one seed (none: no section)."""
    rows = []
    names, methods = _order(cells)
    for name in names:
        for method in methods:
            gaps = (cells.get((name, method)) or {}).get("seed_gaps", {})
            if len(gaps) < 2:
                continue
            values = [gaps[s] for s in sorted(gaps)]
            spread = statistics.stdev(values)
            rows.append(f"| {name} | {method} | {', '.join(map(str, sorted(gaps)))} "
                        f"| {', '.join(f'{v:+.4f}' for v in values)} "
                        f"| {statistics.fmean(values):+.4f} ± "
                        f"{spread / math.sqrt(len(values)):.4f} | {spread:.4f} |")
    if not rows:
        return []
    return ["## Training seeds", "",
            "Gap NLL − H (nats) of each training seed, their mean ± s.e. and the s.d. over "
            "seeds (the randomness of training at this budget).", "",
            "| dataset | method | seeds | gap per seed | mean ± s.e. | s.d. over seeds |",
            "|---|---|---|---|---|---|", *rows, ""]


def report(cells: dict, command: str, figure: str | None) -> str:
    budgets = sorted({c["budget"] for c in cells.values()})
    jobs = sorted({c.get("jobs", 1) for c in cells.values()})
    machines = sorted({c.get("machine", "?") for c in cells.values()})
    versions: dict[str, set] = {}
    for c in cells.values():
        for k, v in (c.get("versions") or {}).items():
            versions.setdefault(k, set()).add(v)
    version_text = ", ".join(f"{k} {'/'.join(sorted(map(str, v)))}"
                             for k, v in sorted(versions.items()))
    return "\n".join([
        "# Discrete flows on the 2-D densities at a fixed budget",
        "",
        f"Command: `{command}`  ",
        f"Machine: {'; '.join(machines)}; {'/'.join(map(str, jobs))} cell(s) at a time, one "
        f"torch thread per process; {version_text}.  ",
        f"Budget: {', '.join(f'{b:g}' for b in budgets)} s of training clock per cell "
        "(validation, logging and checkpoints excluded). Same data stream (seed 0), AdamW at "
        "lr 5e-3 with cosine decay, batch 512 for every method.  ",
        "Test NLL on the 20,000 held-out points of flowlab's fixed test seed, exact "
        "log-densities in float64 (OT-CFM: exact divergence, dopri5 at atol=rtol=1e-6). Gap = "
        "test NLL − H (its s.e. includes the test sample's own scatter); KL paired = mean of "
        "log p_true − log p_model on the same points, with a s.e. free of that scatter. "
        "Throughputs: training samples per second of training clock (steps × batch / "
        "seconds), evaluation test points per second for the float64 log-density, sampling "
        f"samples per second for {N_SAMPLES:,} samples in float32 (median of "
        f"{SAMPLE_REPEATS}).",
        "",
        "## Gap NLL − H (nats)",
        "",
        gap_table(cells),
        "",
        *([f"![gap per method and dataset]({figure})", ""] if figure else []),
        "## Verdict (targets of issue 4)",
        "",
        f"'No worse' than a peer: flowlab's gap at most the peer's + {NO_WORSE_SIGMAS:g} s.e. of "
        f"the difference. Where both ran with the same {MIN_SEEDS} or more training seeds: the "
        "mean over seeds of the per-seed difference, with the s.e. of the seed-to-seed "
        "scatter (the randomness of training). Otherwise: seed 0 alone, with the paired KL "
        "s.e.s combined in quadrature, which holds only the test sample's noise.",
        "",
        verdict_text(verdicts(cells)),
        "",
        *seeds_section(cells),
        "## Throughput (median over datasets, min–max in brackets)",
        "",
        throughput_table(cells),
        "",
        "## Per dataset",
        "",
        dataset_tables(cells),
        "",
    ])


def plot(cells: dict, path: Path) -> None:
    """Heat map of the gap NLL - H (log colour scale; gaps below 1e-3 shown as 1e-3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    names, methods = _order(cells)
    gaps = np.full((len(methods), len(names)), np.nan)
    for i, method in enumerate(methods):
        for j, name in enumerate(names):
            cell = cells.get((name, method))
            if _ok(cell):
                gaps[i, j] = cell["gap_nats"]
    shown = np.where(np.isnan(gaps), np.nan, np.clip(gaps, 1e-3, None))
    finite = shown[np.isfinite(shown)]
    vmax = max(1.0, float(finite.max())) if finite.size else 1.0
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 0.45 * len(methods) + 1.6))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, aspect="auto",
                      norm=LogNorm(vmin=1e-3, vmax=vmax))
    for i, method in enumerate(methods):
        for j, name in enumerate(names):
            cell = cells.get((name, method))
            text = "" if cell is None else "failed" if not _ok(cell) else f"{gaps[i, j]:.3f}"
            bright = np.isfinite(shown[i, j]) and shown[i, j] > math.sqrt(1e-3 * vmax)
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="black" if bright else "white" if np.isfinite(shown[i, j]) else "black")
    # lines between flowlab's discrete flows, the CNF and the peers
    groups = [m in PEERS or m == "ot-cfm" for m in methods], [m in PEERS for m in methods]
    for flags in groups:
        if any(flags) and not all(flags):
            ax.axhline(flags.index(True) - 0.5, color="white", lw=2)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(methods)), methods)
    budgets = sorted({c["budget"] for c in cells.values()})
    ax.set_title(f"test NLL − H (nats) after {', '.join(f'{b:g}' for b in budgets)} s")
    fig.colorbar(image, ax=ax, label="gap (nats, log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(cells: dict, results: Path, command: str) -> str:
    results.mkdir(parents=True, exist_ok=True)
    figure = results / f"{RESULTS_STEM}.png"
    plot(cells, figure)
    text = report(cells, command, figure.name)
    (results / f"{RESULTS_STEM}.md").write_text(text)
    (results / f"{RESULTS_STEM}.json").write_text(json.dumps(
        {"command": command, "verdicts": verdicts(cells),
         "cells": [cells[k] for k in sorted(cells)]}, indent=1))
    return text


# -- the driver --------------------------------------------------------------------------------
def _missing_library(method: str) -> str | None:
    if method not in PEERS:
        return None
    library = method.split("-")[0]
    return None if importlib.util.find_spec(library) else library


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seconds", type=float, default=300.0,
                        help="training budget per cell (seconds of training clock)")
    parser.add_argument("--jobs", type=int, default=1, help="cells at a time (one thread each)")
    parser.add_argument("--runs", type=Path, default=Path("runs/discrete"))
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--seeds", default="0",
                        help="training seeds of every cell, e.g. 0,1,2 (tables show seed 0; "
                             "the others serve the no-worse-than-a-peer verdict)")
    parser.add_argument("--force", action="store_true", help="rerun finished cells")
    parser.add_argument("--table-only", action="store_true",
                        help="rebuild tables and figure from the finished cells in --runs")
    parser.add_argument("--merge", action="store_true",
                        help="start from the cells of the results json already in --results "
                             "(e.g. the published table of a fresh clone, which has no --runs "
                             "folder); cells finished under --runs replace them")
    parser.add_argument("--measure", nargs=2, metavar=("METHOD", "CELL_DIR"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        from flowlab.train.checkpoint import atomic_write_json

        method, cell_dir = args.measure
        atomic_write_json(Path(cell_dir) / MEASURE, measure(method, Path(cell_dir)))
        return
    names = [n for n in args.datasets.split(",") if n]
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for n in names:
        if n not in DATASETS:
            parser.error(f"unknown dataset {n!r}; choose from {', '.join(DATASETS)}")
    if not (args.seconds > 0) or args.jobs < 1:
        parser.error("--seconds must be positive and --jobs at least 1")
    try:
        seeds = sorted({int(s) for s in args.seeds.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--seeds takes whole numbers separated by commas, got {args.seeds!r}")
    if not seeds or min(seeds) < 0:
        parser.error(f"--seeds needs one or more seeds of 0 or more, got {args.seeds!r}")
    published = published_results(parser, args.results / f"{RESULTS_STEM}.json", args.merge)
    if not args.table_only:
        for m in list(methods):
            library = _missing_library(m)
            if library:
                print(f"skipping {m}: {library} is not installed (pip install -e \".[bench]\")")
                methods.remove(m)
        todo = [(m, n, s) for s in seeds for n in names for m in methods
                if args.force or not (cell_folder(args.runs, n, m, s) / CELL).is_file()]
        print(f"{len(todo)} cells of {args.seconds:g} s, {args.jobs} at a time", flush=True)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda job: run_cell(job[0], job[1], args.seconds, args.runs,
                                               args.jobs, job[2]), todo))
    cells = load_cells(args.runs, published["cells"] if published else None)
    if not cells:
        raise SystemExit(f"no finished cells under {args.runs}")
    command = "python benchmarks/discrete_flows.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv) if a != "--table-only")
    print(write_results(cells, args.results, chained_command(published, command)))


if __name__ == "__main__":
    main()
