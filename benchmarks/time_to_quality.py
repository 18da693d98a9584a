"""Time to quality: how soon each way of training a CNF reaches a given test likelihood.

Methods, all trained on the same data stream (seed 0), for the same budget, on the same
machine, in the same run:

- ``ffjord``: flowlab's FFJORD by maximum likelihood (the CLI defaults: 64 x 3 concatsquash
  tanh, exact divergence, dopri5 at 1e-5, learnable T);
- ``ffjord-rnode``: the same with the RNODE regularizers (Finlay et al. 2020), kinetic energy
  and Jacobian Frobenius norm, both weighted 0.01;
- ``cfm``: conditional flow matching, independent coupling (the CLI defaults for ``cfm``:
  256 x 5 concatsquash tanh, linear path, sigma_min 1e-4);
- ``ot-cfm``: the same with minibatch optimal-transport pairs (exact assignment in blocks of
  128 points);
- ``ot-cfm-fourier``: OT-CFM with the Fourier-feature vector field (``--field fourier``:
  64 random frequencies of scale 3 and 8 time harmonics feeding a 256 x 4 swish MLP), which
  learns sharp edges in far fewer steps and takes cheaper steps;
- ``ot-cfm-fourier-60s``: the same trained with a budget of 60 s, so that its learning-rate
  schedule runs its course in that time, as a user who wants a model in a minute would train
  it (the snapshots of a 600-s run at 60 s are taken at the peak learning rate);
- ``ot-cfm-ml``: 60 s in two parts: OT-CFM with FFJORD's 64 x 3 field for 30 s, then maximum
  likelihood from those weights for 30 s (``flowlab train --model ffjord --init``) with a
  fixed-step solver, rk4 with 4 steps, backpropagated directly (no adjoint): 12-15 steps a
  second against FFJORD's 3-4. The likelihood it trains on is that of the discretized flow; every
  number reported is the exact one (dopri5). Fewer steps do not work: with rk4 at 2 steps the
  training NLL on 8gaussians fell to 2.50 nats, below H = 2.83, while the exact NLL rose 1.3
  nats above it;
- ``cfm-avg-fourier-60s``: flow matching with independent pairs and the averaged target
  (``--target averaged``: each pair's velocity replaced by its posterior average over the
  batch, :mod:`flowlab.fm.targets`), the Fourier field, a budget of 60 s;
- ``cfm-avg-fourier-ema-60s``: the same with an exponential moving average of the weights
  (``--ema 0.999``), tried against what is left of the target's noise (on 8gaussians that
  noise, not the network, sets the field's error: ``benchmarks/fm_target_noise.py``); it
  moves each density by about a standard error or less, in both directions;
- ``cfm-avg-sob-fourier-ema-60s``: the same with the Sobolev term (``--sobolev 0.05``: for 64
  rows per batch with t >= 0.25 the field's Jacobian is also regressed on the averaged
  target's), against the Jacobian error that the likelihood integrates and that longer
  training does not lower;
- ``zuko``: the peer, ``zuko.flows.CNF`` (64 x 3 ELU, exact trace, zuko's solver and
  adjoint) trained by maximum likelihood (``benchmarks/peers/zuko_cnf.py``), same learning
  rate and schedule as flowlab's FFJORD.

Each run saves its weights at fixed points of its training clock (snapshots); afterwards each
snapshot is evaluated on held-out points with the exact log-density. At the budgets 60, 180 and
600 s the evaluation is the full one (20,000 fresh points, dopri5 at atol=rtol=1e-6, float64);
the other snapshots, used only to find when the gap to H first falls below 0.10 nats, are
evaluated on the first 2,000 of those points at 1e-5. The final model of each run is then
sampled with fixed-step solvers (euler, midpoint, rk4 at 1..16 steps) and the adaptive one, and
the samples' MMD^2 to fresh data gives the sampling NFE needed for the sample quality of FFJORD
after the full budget.

Usage (from the repository root, after ``pip install -e ".[bench]"``)::

    python benchmarks/time_to_quality.py --jobs 2            # all methods, all 8 datasets
    python benchmarks/time_to_quality.py --datasets rings --methods ffjord,ot-cfm --jobs 2
    python benchmarks/time_to_quality.py --table-only        # rebuild table and plots
    python benchmarks/time_to_quality.py --methods cfm-avg-fourier-60s --jobs 2 --merge
    python benchmarks/time_to_quality.py --datasets 8gaussians --seeds 0,1,2 --jobs 2 \
        --methods ffjord,cfm-avg-fourier-60s,cfm-avg-fourier-ema-60s --merge

Training runs: one run of each method is one draw, and on the easy densities a second
training of FFJORD lands as far from the first as flow matching lands from FFJORD. ``--seeds
0,1,2`` trains each cell again with the other seeds (the initialization and the data stream;
the test points stay the same) and evaluates only their final models, in
``runs/ttq/DATASET/seed-S/METHOD``. Where FFJORD and a flowlab method trained for a tenth of
its budget or less both have three runs or more (MIN_SEEDS), the verdict also compares their
mean final KLs, with the standard error of the difference; the table and figures show seed 0.
Where that verdict is close, ``benchmarks/ttq_recheck.py`` evaluates the same final models
again on more fresh points.

Finished cells (``runs/ttq/DATASET/METHOD/cell.json``) are kept and not rerun unless
``--force``, so the benchmark can be run in parts; the table covers every finished cell.
``--merge`` starts from the published cells (``time_to_quality.json``; a fresh clone has no
``runs/ttq``) and adds or replaces those finished under ``--runs``.
Writes ``benchmarks/results/time_to_quality.{md,json,png}`` and one density figure per dataset
(the published json keeps no density grids: with ``--merge`` a dataset's figure is redrawn only
when all its cells were run here, and each method run here gets a figure of its own across the
datasets, ``time_to_quality_densities_METHOD.png``).
``--jobs 2`` runs two cells at a time, one torch thread each (a 2-D CNF step uses one core as
well as two, measured), so on a 2-core machine each run keeps its own core.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from discrete_flows import chained_command, published_results  # noqa: E402

DATASETS = ("8gaussians", "checkerboard", "2spirals", "pinwheel", "rings", "circles", "moons",
            "swissroll")
METHODS = {
    "ffjord": ["--model", "ffjord"],
    "ffjord-rnode": ["--model", "ffjord", "--kinetic", "0.01", "--jacobian", "0.01"],
    "cfm": ["--model", "cfm"],
    "ot-cfm": ["--model", "cfm", "--coupling", "ot"],
    "ot-cfm-fourier": ["--model", "cfm", "--coupling", "ot", "--field", "fourier"],
    "ot-cfm-fourier-60s": ["--model", "cfm", "--coupling", "ot", "--field", "fourier"],
    "ot-cfm-ml": ["--model", "ffjord", "--solver", "rk4", "--steps", "4", "--no-adjoint"],
    "cfm-avg-fourier-60s": ["--model", "cfm", "--target", "averaged", "--field", "fourier"],
    "cfm-avg-fourier-ema-60s": ["--model", "cfm", "--target", "averaged", "--field", "fourier",
                                "--ema", "0.999"],
    "cfm-avg-sob-fourier-ema-60s": ["--model", "cfm", "--target", "averaged", "--field",
                                    "fourier", "--ema", "0.999", "--sobolev", "0.05"],
    "zuko": None,
}
# methods trained for a budget of their own
SHORT_BUDGETS = {"ot-cfm-fourier-60s": 60.0, "ot-cfm-ml": 60.0, "cfm-avg-fourier-60s": 60.0,
                 "cfm-avg-fourier-ema-60s": 60.0, "cfm-avg-sob-fourier-ema-60s": 60.0}
# methods that start from weights pre-trained by flow matching for the first part of their
# budget: (seconds of pre-training, its `flowlab train` options); METHODS holds the second part
PRETRAIN = {"ot-cfm-ml": (30.0, ["--model", "cfm", "--coupling", "ot", "--hidden", "64,64,64"])}
# flowlab's methods: every one trained by `flowlab train` (the peer has no options there)
FLOWLAB_METHODS = tuple(m for m, options in METHODS.items() if options is not None)
GRID = (10, 20, 30, 45, 60, 90, 120, 180, 300, 450, 600)
BUDGETS = (60, 180, 600)
THRESHOLD = 0.10
N_TEST, N_TRACK = 20_000, 2_000
CELL = "cell.json"
# training runs (seeds) each side needs before the verdict also compares means over runs
MIN_SEEDS = 3
STAGES = {"euler": 1, "midpoint": 2, "rk4": 4}  # function evaluations per fixed step


# -- one cell: train, evaluate the snapshots, sample ------------------------------------------
def _flowlab_model(run: Path, snapshot: str):
    from flowlab.train.checkpoint import load_model

    return load_model(run / "snapshots" / snapshot).double().eval()


def _evaluate_flowlab(run: Path, snapshot: str, points, dataset, full: bool) -> dict:
    from flowlab.eval.nll import evaluate_nll
    from flowlab.ode import SolverConfig

    model = _flowlab_model(run, snapshot)
    tol = 1e-6 if full else 1e-5
    result = evaluate_nll(model, points, batch_size=5000, solver=SolverConfig(atol=tol, rtol=tol),
                          entropy=dataset.entropy, reference=dataset)
    return result.to_dict()


def _evaluate_zuko(run: Path, snapshot: str, points, dataset, full: bool) -> dict:
    from peers import zuko_cnf

    flow = zuko_cnf.load_flow(run, snapshot)
    tol = 1e-6 if full else 1e-5
    row = zuko_cnf.evaluate(flow, points, batch_size=5000, atol=tol, rtol=tol, reference=dataset)
    row.update(entropy_nats=dataset.entropy, gap_nats=row["nll_nats"] - dataset.entropy)
    return row


def _sampling_rows(method: str, run: Path, snapshot: str, dataset) -> list[dict]:
    """Sample quality against NFE of the final model (the same 5,000 base points per row)."""
    import torch

    from flowlab.eval import sample_quality, sampling_sweep

    if method == "zuko":
        from peers import zuko_cnf

        flow = zuko_cnf.load_flow(run, snapshot)
        start = time.perf_counter()
        samples, nfe = zuko_cnf.sample(flow, 5000, seed=0)
        seconds = time.perf_counter() - start
        quality = sample_quality(samples.double(), dataset).to_dict()
        return [{"solver": "zuko dopri5 (1e-6, 1e-5)", "steps": None, "nfe": nfe,
                 "seconds": seconds, **quality, "error": None}]
    model = _flowlab_model(run, snapshot).float()
    with torch.no_grad():
        return sampling_sweep(model, dataset, n=5000, seed=0)


def _density_grid(method: str, run: Path, snapshot: str, bounds: float, resolution: int):
    import torch

    from flowlab.ode import SolverConfig
    from flowlab.viz import grid_log_prob

    if method == "zuko":
        from peers import zuko_cnf

        flow = zuko_cnf.load_flow(run, snapshot).eval()

        def log_prob(x):
            return zuko_cnf.log_density(flow, x, atol=1e-5, rtol=1e-5, dtype=torch.float32)[0]
    else:
        model = _flowlab_model(run, snapshot).float()
        solver = SolverConfig(atol=1e-5, rtol=1e-5)

        def log_prob(x):
            return model.log_prob(x, solver=solver)
    _, _, logp = grid_log_prob(log_prob, bounds, resolution)
    return logp.tolist()


def _train_flowlab(name: str, options: list[str], seconds: float, out: Path,
                   snapshot_at: list[float], seed: int = 0) -> None:
    from flowlab.cli import main as flowlab

    code = flowlab(["train", "--data", name, *options, "--seconds", str(seconds), "--out",
                    str(out), "--force", "--no-progress", "--threads", "1", "--seed", str(seed),
                    "--snapshot-at", ",".join(str(t) for t in snapshot_at)])
    if code != 0:
        raise SystemExit(f"training {options} on {name} into {out} failed")


def _snapshot_index(run: Path, method: str) -> list[dict]:
    """The cell's snapshots in training order, each with the folder (relative to ``run``) it
    lives in. A pre-trained method's two parts are joined on one clock: the fine-tuning's
    times and steps continue from the end of the pre-training."""
    def read(folder: Path) -> list[dict]:
        # flowlab lists its snapshots in snapshots/, the zuko peer beside the folder
        listed = [p for p in (folder / "snapshots" / "snapshots.json",
                              folder / "snapshots.json") if p.is_file()]
        if not listed:
            raise SystemExit(f"no snapshots.json in {folder}: did its training finish?")
        return json.loads(listed[0].read_text())

    if method not in PRETRAIN:
        return [{**entry, "dir": ""} for entry in read(run)]
    first = [{**entry, "dir": "pretrain"} for entry in read(run / "pretrain")]
    offset_t, offset_step = PRETRAIN[method][0], first[-1]["step"]
    second = [{**entry, "dir": "finetune", "at": entry["at"] + offset_t,
               "seconds": entry["seconds"] + first[-1]["seconds"],
               "step": entry["step"] + offset_step} for entry in read(run / "finetune")]
    return first + second


def run_cell(method: str, name: str, seconds: float, run: Path, zuko_lr: float) -> None:
    """Train one (method, dataset) cell in this process, then evaluate it into cell.json."""
    import torch

    from flowlab.data import get_dataset
    from flowlab.eval import heldout_points

    torch.set_num_threads(1)
    seconds = min(seconds, SHORT_BUDGETS.get(method, seconds))
    grid = [t for t in GRID if t < seconds] + [seconds]
    wall = time.perf_counter()
    if method == "zuko":
        from peers import zuko_cnf

        shutil.rmtree(run, ignore_errors=True)  # a rerun starts clean, as --force does
        zuko_cnf.train(name, seconds, run, snapshot_at=grid, lr=zuko_lr)
    elif method in PRETRAIN:
        split, first = PRETRAIN[method]
        _train_flowlab(name, first, split, run / "pretrain",
                       [t for t in grid if t < split] + [split])
        _train_flowlab(name, [*METHODS[method], "--init", str(run / "pretrain")],
                       seconds - split, run / "finetune", [t - split for t in grid if t > split])
    else:
        _train_flowlab(name, METHODS[method], seconds, run, grid)
    train_wall = time.perf_counter() - wall
    dataset = get_dataset(name)
    points = heldout_points(dataset, N_TEST)
    index = _snapshot_index(run, method)
    evaluate = _evaluate_zuko if method == "zuko" else _evaluate_flowlab
    rows = []
    for entry in index:
        full = entry["at"] in BUDGETS or entry["at"] == seconds
        row = evaluate(run / entry["dir"], entry["file"], points if full else points[:N_TRACK],
                       dataset, full)
        row["eval_seconds"] = row.pop("seconds")  # "seconds" is the training clock
        rows.append({**entry, **row, "full": full})
        print(f"{name:>12} {method:>12} t={entry['at']:>5.0f}s step {entry['step']:>6} "
              f"gap {row['gap_nats']:+.4f} ± {row['nll_se']:.4f} (n={row['n_test']})", flush=True)
    final, final_run = index[-1]["file"], run / index[-1]["dir"]
    cell = {
        "method": method, "dataset": name, "entropy": dataset.entropy, "budget": seconds,
        "train_wall_seconds": train_wall, "snapshots": rows,
        "sampling": _sampling_rows(method, final_run, final, dataset),
        "density": _density_grid(method, final_run, final, dataset.bounds, 80),
    }
    (run / CELL).write_text(json.dumps(cell))


def replicate_folder(runs: Path, name: str, method: str, seed: int) -> Path:
    """Where a cell's run with training seed ``seed`` lives (seed 0: the table's own cell)."""
    return runs / name / method if seed == 0 else runs / name / f"seed-{seed}" / method


def run_replicate(method: str, name: str, seconds: float, run: Path, seed: int) -> None:
    """Train a cell again with another training seed (the initialization and the data stream)
    and evaluate its final model only, in full: replicates give the verdict the spread of a
    second training, which one run on one test sample cannot show."""
    import torch

    from flowlab.data import get_dataset
    from flowlab.eval import heldout_points

    torch.set_num_threads(1)
    seconds = min(seconds, SHORT_BUDGETS.get(method, seconds))
    _train_flowlab(name, METHODS[method], seconds, run, [seconds], seed=seed)
    dataset = get_dataset(name)
    final = _snapshot_index(run, method)[-1]
    row = _evaluate_flowlab(run, final["file"], heldout_points(dataset, N_TEST), dataset, True)
    replicate = {"method": method, "dataset": name, "seed": seed, "budget": seconds,
                 "step": final["step"], **{k: row[k] for k in ("gap_nats", "nll_se", "kl_nats",
                                                             "kl_se")}}
    print(f"{name:>12} {method:>12} seed {seed} t={seconds:.0f}s step {final['step']:>6} "
          f"KL {row['kl_nats']:.4f} ± {row['kl_se']:.4f}", flush=True)
    (run / CELL).write_text(json.dumps(replicate))


# -- the table ---------------------------------------------------------------------------------
def _at(cell: dict, budget: float) -> dict | None:
    return next((r for r in cell["snapshots"] if r["at"] == budget), None)


def time_to(cell: dict, test) -> float | None:
    """Training time of the first snapshot that passes ``test`` (None: never)."""
    return next((r["seconds"] for r in cell["snapshots"] if test(r)), None)


def sampling_nfe(cell: dict, target_mmd: float | None) -> int | None:
    """Fewest sampling NFE whose samples' MMD^2 to fresh data is at most ``target_mmd``."""
    if target_mmd is None:
        return None
    ok = [r["nfe"] for r in cell["sampling"] if r.get("mmd2") is not None
          and r["mmd2"] <= target_mmd]
    return min(ok) if ok else None


def best_flowlab_gap_by(row_cells: dict[str, dict], budget: float) -> float | None:
    """The smallest gap any flowlab CNF has reached within ``budget`` seconds of training, in
    a full evaluation: a model trained for 60 s is there to use at 180 s."""
    return min((r["gap_nats"] for m in FLOWLAB_METHODS if m in row_cells
                for r in row_cells[m]["snapshots"]
                if r["full"] and r["at"] <= budget),
               default=None)


def _mean_se(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "se": statistics.stdev(values) / math.sqrt(
        len(values)), "runs": len(values)}


def training_runs(cell: dict | None, replicates: dict[int, dict]) -> dict[int, dict]:
    """A method's training runs by seed, each with its final paired KL and steps: the table's
    cell (seed 0, its last snapshot, at the end of its budget) and its replicates."""
    runs = dict(replicates)
    if cell is not None and cell["snapshots"][-1].get("kl_nats") is not None:
        last = cell["snapshots"][-1]
        runs[0] = {"kl_nats": last["kl_nats"], "step": last["step"]}
    return dict(sorted(runs.items()))


def final_kls(cell: dict | None, replicates: dict[int, dict]) -> list[float]:
    """The final paired KLs of a method's training runs, in the order of their seeds."""
    return [run["kl_nats"] for run in training_runs(cell, replicates).values()]


def replicated_verdict(row_cells: dict[str, dict], row_replicates: dict[str, dict[int, dict]],
                       budget: float) -> dict | None:
    """FFJORD's final KL at ``budget`` against each flowlab method trained for a tenth of it or
    less, as means over training runs (None: fewer than MIN_SEEDS runs on either side).

    One run of each is a single draw: on the easy densities two trainings of FFJORD differ by
    as much as FFJORD and flow matching do. The means' difference gets the s.e. of two
    independent means (the methods share only the seed, not a data stream or a path).
    """
    reference = final_kls(row_cells.get("ffjord"), row_replicates.get("ffjord", {}))
    if len(reference) < MIN_SEEDS:
        return None
    ref = _mean_se(reference)
    methods = {}
    for method in FLOWLAB_METHODS:
        if method == "ffjord" or SHORT_BUDGETS.get(method, budget) > budget / 10:
            continue
        kls = final_kls(row_cells.get(method), row_replicates.get(method, {}))
        if len(kls) < MIN_SEEDS:
            continue
        mine = _mean_se(kls)
        methods[method] = {**mine, "kls": kls, "diff": mine["mean"] - ref["mean"],
                           "diff_se": math.hypot(mine["se"], ref["se"]),
                           "reaches": mine["mean"] <= ref["mean"]}
    if not methods:
        return None
    best = min(methods, key=lambda m: methods[m]["mean"])
    return {"ffjord": {**ref, "kls": reference}, "methods": methods, "best": best}


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def summarize(cells: dict[tuple[str, str], dict], budgets: tuple[float, ...],
              replicates: dict[tuple[str, str], dict[int, dict]] | None = None,
              ) -> tuple[str, dict]:
    lines = [
        "| dataset | method | steps | " + " | ".join(f"gap @ {b:.0f} s" for b in budgets)
        + f" | KL @ {budgets[-1]:.0f} s | time to gap ≤ {THRESHOLD} | time to FFJORD@"
        f"{budgets[-1]:.0f}s quality | NFE eval | NFE sampling at FFJORD quality |",
        "|---|---|---|" + "---|" * len(budgets) + "---|---|---|---|---|",
    ]
    verdicts = {}
    for name in DATASETS:
        row_cells = {m: cells[(name, m)] for m in METHODS if (name, m) in cells}
        if not row_cells:
            continue
        reference = row_cells.get("ffjord")
        ref_final = _at(reference, budgets[-1]) if reference else None
        ref_kl = ref_final["kl_nats"] if ref_final else None
        ref_mmd = None
        if reference:
            adaptive = [r for r in reference["sampling"] if r["steps"] is None and r.get("mmd2")]
            ref_mmd = adaptive[0]["mmd2"] + 2 * adaptive[0]["mmd2_se"] if adaptive else None
        reach = {}
        for method, cell in row_cells.items():
            final = cell["snapshots"][-1]
            gaps = []
            for b in budgets:
                r = _at(cell, b)
                gaps.append("-" if r is None else f"{r['gap_nats']:+.3f} ± {r['nll_se']:.3f}")
            t_thr = time_to(cell, lambda r: r["gap_nats"] <= THRESHOLD)
            # judged on full evaluations only: a 2,000-point KL has a standard error of
            # about 0.002 nats, as large as FFJORD's final KL on the easy densities
            t_ref = (time_to(cell, lambda r, kl=ref_kl: r["full"] and r["kl_nats"] <= kl)
                     if ref_kl is not None else None)
            reach[method] = t_ref
            kl = _at(cell, budgets[-1])
            lines.append(
                f"| {name} | {method} | {final['step']} | " + " | ".join(gaps)
                + f" | {_fmt(kl and kl['kl_nats'], '.4f')} | {_fmt(t_thr, '.0f', '> budget')}"
                + f" | {_fmt(t_ref, '.0f', '> budget')} | {_fmt(final.get('nfe'), '.0f')}"
                + f" | {_fmt(sampling_nfe(cell, ref_mmd), 'd', 'not reached')} |"
            )
        flowlab_times = [reach[m] for m in FLOWLAB_METHODS if m != "ffjord" and reach.get(m)]
        best = min(flowlab_times) if flowlab_times else None
        # the nearest any other flowlab CNF came to FFJORD's final quality, and when
        closest = min(((r["kl_nats"], r["seconds"], m) for m in FLOWLAB_METHODS
                       if m != "ffjord" and m in row_cells
                       for r in row_cells[m]["snapshots"]
                       if r["full"] and r.get("kl_nats") is not None),
                      default=None)
        zuko = row_cells.get("zuko")
        beats_zuko = None
        if zuko is not None:
            beats_zuko = all(
                (best_gap := best_flowlab_gap_by(row_cells, b)) is not None
                and best_gap < _at(zuko, b)["gap_nats"]
                for b in budgets if _at(zuko, b)
            )
        verdicts[name] = {
            "ffjord_kl": ref_kl,
            "best_time_to_ffjord_quality": best,
            "speedup": (budgets[-1] / best) if best else None,
            "closest": None if closest is None else {
                "kl_nats": closest[0], "seconds": closest[1], "method": closest[2]},
            "smaller_gap_than_zuko_at_every_budget": beats_zuko,
            "replicated": replicated_verdict(
                row_cells, {m: r for (n, m), r in (replicates or {}).items() if n == name},
                budgets[-1]),
        }
    return "\n".join(lines), verdicts


def verdict_line(name: str, verdict: dict, budget: float) -> str:
    """One dataset's verdict on the targets of issue 3, in words."""
    quality = f"FFJORD's {budget:.0f}-s paired KL"
    if verdict.get("ffjord_kl") is not None:
        quality += f" ({verdict['ffjord_kl']:.4f} nats)"
    if verdict["best_time_to_ffjord_quality"] is not None:
        text = (f"the best flowlab CNF other than FFJORD reaches {quality} at "
                f"{verdict['best_time_to_ffjord_quality']:.0f} s "
                f"({verdict['speedup']:.0f}x sooner)")
    elif verdict.get("ffjord_kl") is None:
        text = f"no ffjord run at {budget:.0f} s to compare with"
    else:
        closest = verdict.get("closest")
        text = f"no other flowlab CNF reaches {quality} in the runs made" + (
            "" if closest is None else f" (closest: {closest['method']}, "
            f"{closest['kl_nats']:.4f} nats at {closest['seconds']:.0f} s)")
    replicated = verdict.get("replicated")
    if replicated is not None:
        ref, best = replicated["ffjord"], replicated["methods"][replicated["best"]]
        text += (f"; over training runs, FFJORD's {budget:.0f}-s KL averages {ref['mean']:.4f} "
                 f"± {ref['se']:.4f} ({ref['runs']} runs) and {replicated['best']}'s "
                 f"{best['mean']:.4f} ± {best['se']:.4f} ({best['runs']} runs): "
                 f"{'reached' if best['reaches'] else 'not reached'} on average (difference "
                 f"{best['diff']:+.4f} ± {best['diff_se']:.4f})")
    beats = verdict["smaller_gap_than_zuko_at_every_budget"]
    if beats is not None:
        text += f"; smaller gap than zuko at every budget: {'yes' if beats else 'no'}"
    return f"- {name}: {text}"


def replicates_section(cells: dict[tuple[str, str], dict],
                       replicates: dict[tuple[str, str], dict[int, dict]]) -> str:
    """The report's section with the final KL of each training run, for every cell with
    replicates ('' if none)."""
    lines = []
    for name, method in sorted(replicates, key=lambda k: (DATASETS.index(k[0]),
                                                          list(METHODS).index(k[1]))):
        runs = training_runs(cells.get((name, method)), replicates[(name, method)])
        kls = [run["kl_nats"] for run in runs.values()]
        spread = "-" if len(kls) < 2 else "{mean:.4f} ± {se:.4f}".format(**_mean_se(kls))
        lines.append(f"| {name} | {method} | " + ", ".join(
            f"{seed}: {run['kl_nats']:.4f} ({run['step']} steps)" for seed, run in runs.items())
            + f" | {spread} |")
    if not lines:
        return ""
    return ("## Training runs\n\nThe final paired KL (20,000 points, the same for every run) of "
            "each run of the cells trained with more than one seed (`--seeds`); seed 0 is the "
            "table's run. The verdict's means over runs above come from these.\n\n"
            "| dataset | method | final paired KL by training seed | mean ± s.e. over runs |\n"
            "|---|---|---|---|\n" + "\n".join(lines) + "\n\n")


def sampling_table(cells: dict[tuple[str, str], dict]) -> str:
    """MMD^2 (x 1e3) of 5,000 samples to fresh data against the sampler, per final model."""
    columns = ([("euler", k) for k in (1, 2, 4, 8, 16)] + [("midpoint", k) for k in (1, 2, 4, 8)]
               + [("rk4", k) for k in (1, 2, 4)])
    lines = [
        "| dataset | method | " + " | ".join(f"{s} {k} (NFE {k * STAGES[s]})"
                                             for s, k in columns)
        + " | adaptive: NFE, MMD² | adaptive: cross-entropy − H |",
        "|---|---|" + "---|" * (len(columns) + 2),
    ]
    for (name, method), cell in sorted(cells.items(), key=lambda kv: (
            DATASETS.index(kv[0][0]), list(METHODS).index(kv[0][1]))):
        rows = {(r["solver"], r["steps"]): r for r in cell["sampling"]}
        adaptive = next((r for r in cell["sampling"] if r["steps"] is None), None)

        def mmd(r):
            return "-" if r is None or r.get("mmd2") is None else f"{1e3 * r['mmd2']:.2f}"

        cross = ("-" if adaptive is None or adaptive.get("cross_entropy") is None
                 else f"{adaptive['cross_entropy'] - cell['entropy']:+.3f}")
        lines.append(
            f"| {name} | {method} | " + " | ".join(mmd(rows.get(c)) for c in columns)
            + f" | {adaptive['nfe'] if adaptive else '-'}, {mmd(adaptive)} | {cross} |"
        )
    return "\n".join(lines)


def plot(cells: dict[tuple[str, str], dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in DATASETS if any((n, m) in cells for m in METHODS)]
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for method in METHODS:
            cell = cells.get((name, method))
            if cell is None:
                continue
            snaps = cell["snapshots"]
            # one colour per method in every panel, so that one legend serves them all
            ax.plot([r["seconds"] for r in snaps], [max(r["gap_nats"], 1e-3) for r in snaps],
                    marker="o", ms=3, label=method, color=f"C{list(METHODS).index(method)}")
        ax.axhline(THRESHOLD, color="grey", ls="--", lw=0.8)
        ax.set(xscale="log", yscale="log", title=name, xlabel="training time (s)",
               ylabel="test NLL − H (nats)")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):
                handles.setdefault(line.get_label(), line)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles),
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _density_panels(ax, dens, bounds, vmax, title) -> None:
    ax.imshow(dens, origin="lower", extent=(-bounds, bounds, -bounds, bounds), vmin=0,
              vmax=vmax)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_densities(cells: dict[tuple[str, str], dict], results: Path,
                   per_method: bool = False) -> list[Path]:
    """One figure per dataset: the true density and each method's, where every cell of the
    dataset has its density grid (merged published cells have none: their figure stays); with
    ``per_method``, also one figure per method whose cells all have grids, the truth above the
    model on each dataset.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from flowlab.data import get_dataset
    from flowlab.viz import grid_log_prob

    truths = {}

    def truth(name):
        if name not in truths:
            dataset = get_dataset(name)
            _, _, true = grid_log_prob(dataset.log_prob, dataset.bounds, 80, dtype=torch.float64)
            truths[name] = (np.exp(true), dataset.bounds)
        return truths[name]

    written = []
    for name in DATASETS:
        methods = [m for m in METHODS if (name, m) in cells]
        if not methods or any("density" not in cells[(name, m)] for m in methods):
            continue
        true, bounds = truth(name)
        panels = [("true density", true)] + [
            (f"{m} @ {cells[(name, m)]['budget']:.0f} s",
             np.exp(np.asarray(cells[(name, m)]["density"]))) for m in methods
        ]
        fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8))
        for ax, (title, dens) in zip(np.atleast_1d(axes), panels, strict=True):
            _density_panels(ax, dens, bounds, true.max(), title)
        fig.tight_layout()
        path = results / f"time_to_quality_{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    for method in METHODS if per_method else ():
        names = [n for n in DATASETS if (n, method) in cells]
        if not names or any("density" not in cells[(n, method)] for n in names):
            continue
        fig, axes = plt.subplots(2, len(names), figsize=(2.2 * len(names), 4.6), squeeze=False)
        for col, name in enumerate(names):
            true, bounds = truth(name)
            cell = cells[(name, method)]
            _density_panels(axes[0, col], true, bounds, true.max(), f"{name}: truth")
            _density_panels(axes[1, col], np.exp(np.asarray(cell["density"])), bounds,
                            true.max(), f"model @ {cell['budget']:.0f} s")
        fig.suptitle(f"{method}: the true density (top), the model's (bottom)", fontsize=10)
        fig.tight_layout()
        path = results / f"time_to_quality_densities_{method}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def load_cells(runs: Path, published: list[dict] | None = None) -> dict[tuple[str, str], dict]:
    """The finished cells under ``runs`` by (dataset, method). ``published``: the cells of a
    results json written before (``--merge``); a cell finished under ``runs`` replaces one."""
    cells = {(cell["dataset"], cell["method"]): cell for cell in published or ()}
    for path in sorted(runs.glob(f"*/*/{CELL}")):
        cell = json.loads(path.read_text())
        cells[(cell["dataset"], cell["method"])] = cell
    return cells


def load_replicates(runs: Path, published: list[dict] | None = None,
                    ) -> dict[tuple[str, str], dict[int, dict]]:
    """The replicates (runs with a training seed other than 0) by (dataset, method), then seed;
    those finished under ``runs`` replace published ones of the same seed."""
    out: dict[tuple[str, str], dict[int, dict]] = {}
    found = sorted(runs.glob(f"*/seed-*/*/{CELL}"))
    for replicate in [*(published or ()), *(json.loads(p.read_text()) for p in found)]:
        out.setdefault((replicate["dataset"], replicate["method"]), {})[replicate["seed"]] = \
            replicate
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seconds", type=float, default=600.0, help="training budget per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each)")
    parser.add_argument("--runs", type=Path, default=Path("runs/ttq"))
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--zuko-lr", type=float, default=5e-3,
                        help="learning rate of the zuko peer (flowlab's FFJORD default)")
    parser.add_argument("--seeds", default="0",
                        help="training seeds, e.g. 0,1,2: seed 0 is the table's run; each other "
                             "seed trains a replicate whose final model is evaluated, for the "
                             "verdict's means over training runs")
    parser.add_argument("--force", action="store_true", help="rerun finished cells")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--merge", action="store_true",
                        help="start from the published cells (time_to_quality.json) and add or "
                             "replace those finished under --runs")
    parser.add_argument("--cell", nargs=3, metavar=("METHOD", "DATASET", "SEED"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        method, name, seed = args.cell[0], args.cell[1], int(args.cell[2])
        run = replicate_folder(args.runs, name, method, seed)
        if seed == 0:
            run_cell(method, name, args.seconds, run, args.zuko_lr)
        else:
            run_replicate(method, name, args.seconds, run, seed)
        return
    names = [n for n in args.datasets.split(",") if n]
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for n in names:
        if n not in DATASETS:
            parser.error(f"unknown dataset {n!r}; choose from {', '.join(DATASETS)}")
    try:
        seeds = sorted({int(v) for v in args.seeds.split(",") if v.strip()})
    except ValueError:
        parser.error(f"--seeds takes whole numbers separated by commas, e.g. 0,1,2; got "
                     f"{args.seeds!r}")
    if not seeds or seeds[0] < 0:
        parser.error(f"--seeds takes seeds 0 or more, e.g. 0,1,2; got {args.seeds!r}")
    if seeds != [0]:
        refused = [m for m in methods if m not in FLOWLAB_METHODS or m in PRETRAIN]
        if refused:
            parser.error(f"replicates (seeds other than 0) are trained for flowlab's one-part "
                         f"methods only, not {', '.join(refused)}; leave those out of --methods")
    published = published_results(parser, args.results / "time_to_quality.json", args.merge)
    if not args.table_only:
        todo = [(m, n, seed) for seed in seeds for n in names for m in methods
                if args.force or not (replicate_folder(args.runs, n, m, seed) / CELL).is_file()]
        lengths = sorted({min(args.seconds, SHORT_BUDGETS.get(m, args.seconds))
                          for m, _, _ in todo})
        print(f"{len(todo)} runs of {' or '.join(f'{b:.0f}' for b in lengths) or 0} s, "
              f"{args.jobs} at a time", flush=True)

        def launch(job):
            method, name, seed = job
            cmd = [sys.executable, __file__, "--cell", method, name, str(seed), "--seconds",
                   str(args.seconds), "--runs", str(args.runs), "--zuko-lr", str(args.zuko_lr)]
            subprocess.run(cmd, check=True)

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(launch, todo))
    cells = load_cells(args.runs, published["cells"] if published else None)
    if not cells:
        raise SystemExit(f"no finished runs under {args.runs}")
    replicates = load_replicates(args.runs, published.get("replicates") if published else None)
    budgets = tuple(b for b in BUDGETS if b < args.seconds) + (args.seconds,)
    text_table, verdicts = summarize(cells, budgets, replicates)
    args.results.mkdir(parents=True, exist_ok=True)
    plot(cells, args.results / "time_to_quality.png")
    plot_densities(cells, args.results, per_method=args.merge)
    machine = (f"{platform.machine()}, {platform.processor() or 'cpu'}, Python "
               f"{platform.python_version()}, {args.jobs} run(s) at a time, one thread each")
    verdict_lines = "\n".join(verdict_line(n, v, budgets[-1]) for n, v in verdicts.items())
    command = chained_command(published, "python benchmarks/time_to_quality.py " + " ".join(
        a for a in (sys.argv[1:] if argv is None else argv) if a != "--table-only"))
    text = (
        "# Time to quality of CNFs on the 2-D densities\n\n"
        f"Command: `{command}`  \nMachine: {machine}.  \n"
        f"Gaps are test NLL − H in nats ± 1 s.e. at the budgets, on {N_TEST:,} fresh points "
        "(exact divergence, dopri5 atol=rtol=1e-6, float64); the time to a gap of "
        f"{THRESHOLD} uses all snapshots (those off the budgets on {N_TRACK:,} points at 1e-5), "
        "the time to FFJORD's quality only the full evaluations (at the budgets and the end of "
        "each run; a 2,000-point KL is too noisy to compare with KLs of 0.001-0.01 nats). "
        "'FFJORD@budget quality' is the paired KL(data‖model) that ffjord has at the end of "
        "its budget; 'smaller gap than zuko at every budget' compares zuko's gap at each budget "
        "with the smallest gap any flowlab CNF has reached by then (full evaluations); "
        "sampling NFE is the fewest function evaluations (euler/midpoint/rk4 at 1-16 steps, "
        "or adaptive) whose samples' MMD² to fresh data is within 2 s.e. of ffjord's adaptive "
        f"samples.\n\n{text_table}\n\n{verdict_lines}\n\n{replicates_section(cells, replicates)}"
        "![gap against time](time_to_quality.png)\n"
        "\n## Sampling: quality against NFE\n\nMMD² × 1e3 between 5,000 samples of the "
        "final model and 5,000 fresh data points (0 for a perfect model; the same base noise in "
        "every column; zuko samples only with its own adaptive solver).\n\n"
        f"{sampling_table(cells)}\n"
    )
    (args.results / "time_to_quality.md").write_text(text)
    (args.results / "time_to_quality.json").write_text(json.dumps(
        {"command": command, "machine": machine, "verdicts": verdicts, "cells": [
            {k: v for k, v in c.items() if k != "density"} for c in cells.values()],
         "replicates": [r for runs in replicates.values() for r in runs.values()]}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
