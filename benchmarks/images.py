"""Every image-capable flowlab model on one image data set at one training budget.

What: for each method (a cell), the test bits per dimension +- s.e. over the test images, the
number of test images, the parameters, training steps and seconds, NFE of one evaluation
solve (CNFs), the evaluation and sampling times; a curve of validation bits/dim against
training time per method; and a grid of 64 samples per method.

Methods (``flowlab train`` options, each the command a user would run):

- ``ffjord-multiscale``: FFJORD's image CNF (convolutional concatsquash fields, squeeze and
  factor-out between scales), maximum likelihood with Hutchinson's estimator;
- ``ffjord-mlp``: one CNF block with an MLP field on the flattened pixels, maximum likelihood;
- ``cfm-unet``: a CNF trained by flow matching with a small U-Net field on the images;
- ``cfm-mlp``: a CNF trained by flow matching with an MLP field on the flattened pixels;
- ``realnvp``, ``glow``: multiscale discrete flows on the images;
- ``maf``: a masked autoregressive flow on the flattened pixels.

How: one subprocess per step, as a user would run them: ``flowlab train --data D --model ...
--keep-best --val-every 40 --seconds S --out RUN --force --no-progress --threads N`` (the
weights with the best validation NLL are kept: model selection on the validation split
carved from the training images), then ``flowlab eval RUN`` (test
bits/dim with uniform dequantization noise of the fixed test seed, over the whole test split
unless ``--n-test``; CNFs by the ODE, with Hutchinson's estimator averaged over ``--probes``
probes where the eval divergence is Hutchinson's), then a measurement process (parameters,
sampling time, a sample grid), then ``flowlab plot RUN`` (interpolations in the base space;
for a CNF the GIF of test images carried to noise and back). ``--train-args`` and
``--eval-args`` add options to every method's ``flowlab train`` and ``flowlab eval`` (each
cell records its command); on MNIST on a CPU a CNF's validation and exact trace by the ODE
cost more than the budget, hence ``--no-keep-best`` and ``--divergence hutchinson``. A cell
that fails is recorded with its error and the benchmark goes on.

Usage (from the repository root, after ``pip install -e ".[bench]"``)::

    python benchmarks/images.py --data digits --seconds 900           # 15 minutes per model
    python benchmarks/images.py --data mnist --data-dir ../shared/data/mnist \\
        --methods glow --seconds 2400 --train-args "--batch-size 64 --lr 1e-3"
    python benchmarks/images.py --data mnist --data-dir ../shared/data/mnist \\
        --methods cfm-unet --seconds 1200 --no-keep-best --n-test 64 \\
        --train-args "--hidden 16,32 --batch-size 32 --lr 2e-3 --val-every 0" \\
        --eval-args "--divergence hutchinson --probes 2"
    python benchmarks/images.py --data digits --table-only             # rebuild the report
    python benchmarks/images.py --data digits --methods maf --merge    # rerun one, keep the rest

Finished cells (``runs/images/DATA/METHOD/cell.json``) are kept and not rerun unless
``--force``. Writes ``benchmarks/results/images_DATA.{md,json,png}``,
``benchmarks/results/images_DATA_samples_METHOD.png`` and the ``interpolations`` and ``flow``
pictures of each method.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from discrete_flows import (  # noqa: E402
    _median_time,
    chained_command,
    machine_line,
    published_results,
    run_steps,
)

METHODS = {
    # (FFJORD's 64-channel image field takes minutes per step of 512 images on one CPU core:
    # narrower fields and smaller batches give a CPU budget some hundreds of steps)
    "ffjord-multiscale": ["--model", "ffjord-multiscale", "--hidden", "32,32", "--batch-size",
                          "128", "--lr", "2e-3"],
    "ffjord-mlp": ["--model", "ffjord", "--field", "mlp", "--hidden", "256,256,256",
                   "--divergence", "hutchinson", "--batch-size", "128", "--lr", "2e-3"],
    "cfm-unet": ["--model", "cfm", "--field", "unet"],
    "cfm-mlp": ["--model", "cfm", "--field", "mlp", "--hidden", "512,512,512"],
    "realnvp": ["--model", "realnvp"],
    "glow": ["--model", "glow"],
    "maf": ["--model", "maf"],
}
# The discrete flows overfit digits' 1,350 training images within their first few hundred
# steps (MAF, validated 40 times in 900 s, chose its first validation, at step 2,580, and
# scored 2.78 bits/dim; validated 400 times, 2.31; RealNVP and Glow chose their first
# validation too), and validating their 150 images costs next to nothing: there they validate
# FREQUENT_VALIDATIONS times. (On MNIST a validation of Glow takes seconds, and 400 of them
# would outlast the training.)
FREQUENT_VALIDATION = {"digits": {"maf", "realnvp", "glow"}}
# Every method keeps its best validation weights (the small image sets are overfitted within
# minutes: MAF on digits within 10 s) and validates often enough for that to matter: this many
# times over its budget, or FREQUENT_VALIDATIONS times where FREQUENT_VALIDATION says so.
VALIDATIONS, FREQUENT_VALIDATIONS = 40, 400
BASELINES = ("realnvp", "glow", "maf")  # the discrete flows a CNF has to beat
CELL, MEASURE, OUTPUT, RUN = "cell.json", "measure.json", "output.txt", "run"
TRAIN_OUTPUT = "train_output.txt"  # the training's output, kept when --no-train evaluates again
N_SAMPLES, SAMPLE_REPEATS = 64, 3
PICTURES = ("interpolations.png", "flow.gif")
LAYOUT_WORDS = {"image": "as images (C, H, W)", "flat": "as flattened pixel vectors"}


def picture_name(data: str, name: str, method: str) -> str:
    """The results file of a run's picture: ``flow.gif`` -> ``images_DATA_flow_METHOD.gif``."""
    return f"images_{data}_{Path(name).stem}_{method}{Path(name).suffix}"


# -- one cell ----------------------------------------------------------------------------------
def train_options(method: str, args: argparse.Namespace, run: Path, threads: int) -> list[str]:
    """``flowlab train ...`` of one cell: the model selection (unless ``--no-keep-best``), the
    method's options, then ``--train-args`` (later options win)."""
    data = ["--data", args.data] + (["--data-dir", str(args.data_dir)] if args.data_dir else [])
    selection = []
    if not args.no_keep_best:
        often = method in FREQUENT_VALIDATION.get(args.data, ())
        selection = ["--keep-best", "--val-every",
                     str(FREQUENT_VALIDATIONS if often else VALIDATIONS)]
    return ["train", *data, *selection, *METHODS[method], *shlex.split(args.train_args or ""),
            "--seconds", str(args.seconds), "--out", str(run), "--force", "--no-progress",
            "--threads", str(threads)]


def cell_commands(method: str, args: argparse.Namespace, cell_dir: Path,
                  threads: int) -> list[list[str]]:
    run = cell_dir / RUN
    py = sys.executable
    evaluate = [py, "-m", "flowlab.cli", "eval", str(run), "--threads", str(threads)]
    if args.n_test:
        evaluate += ["--n-test", str(args.n_test)]
    if args.probes and method == "ffjord-multiscale":  # the one evaluated with Hutchinson's
        evaluate += ["--probes", str(args.probes)]
    evaluate += shlex.split(args.eval_args or "")
    train = [] if args.no_train else [
        [py, "-m", "flowlab.cli", *train_options(method, args, run, threads)]]
    return [
        *train,
        evaluate,
        [py, str(Path(__file__).resolve()), "--measure", method, str(cell_dir),
         "--threads", str(threads)],
        # interpolations in the base space, and for a CNF the GIF data -> noise -> data
        [py, "-m", "flowlab.cli", "plot", str(run), "--threads", str(threads)],
    ]


def validation_curve(run: Path) -> list[tuple[float, float]]:
    """``(training seconds, validation bits/dim)`` from the run's log.

    The log holds the validation NLL in nats in the model's space; the preprocessing's
    log-Jacobian of the (fixed) validation points turns it into bits/dim of the data.
    """
    import torch

    from flowlab.data.image_task import VALIDATION_NOISE_SEED, ImageTask
    from flowlab.train.checkpoint import LOG

    config = json.loads((run / "config.json").read_text())
    task = ImageTask.from_config(config["data"])
    generator = torch.Generator().manual_seed(VALIDATION_NOISE_SEED)
    _, ldj = task.to_model(task.valid.images, generator)
    mean_ldj = float(ldj.double().mean())
    curve = []
    for line in (run / LOG).read_text().splitlines():
        record = json.loads(line)
        if "val_nll" in record:
            bpd = (record["val_nll"] - mean_ldj) / (task.dim * math.log(2))
            curve.append((record["seconds"], bpd))
    return curve


def measure(method: str, cell_dir: Path, threads: int) -> dict[str, Any]:
    """Parameters, training steps and clock, sampling time and a sample grid of a cell."""
    import torch

    from flowlab.data.image_task import ImageTask
    from flowlab.train import load_run
    from flowlab.train.checkpoint import list_checkpoints, load_tensors
    from flowlab.viz import save_image_grid

    torch.set_num_threads(threads)
    run = cell_dir / RUN
    model, config = load_run(run)
    task = ImageTask.from_config(config["data"])
    _, meta = load_tensors(list_checkpoints(run)[0])  # the final checkpoint
    model = model.float().eval()
    grids = []

    def draw(seed: int) -> None:
        torch.manual_seed(seed)
        grids.append(model.sample((N_SAMPLES,)))

    median, times = _median_time(draw, SAMPLE_REPEATS)
    finite = all(bool(torch.isfinite(g).all()) for g in grids)
    save_image_grid(task.to_pixels(torch.nan_to_num(grids[0])), cell_dir / "samples.png",
                    task.levels, columns=8)
    return {
        "parameters": model.num_parameters(), "train_steps": int(meta["step"]),
        "train_seconds": float(meta["seconds"]), "best": meta.get("best"),
        "batch_size": int(config["train"]["batch_size"]), "sample_n": N_SAMPLES,
        "sample_seconds": median, "sample_seconds_all": times, "samples_finite": finite,
        "curve": validation_curve(run), "task": task.describe(),
        "versions": {"flowlab": config.get("flowlab_version"), "torch": torch.__version__},
    }


def earlier_training(cell_dir: Path) -> str:
    """``--no-train``: the ``flowlab train`` command of the cell's existing run (from the
    cell's output, which is kept as ``train_output.txt``)."""
    if not (cell_dir / RUN / "model.safetensors").is_file():
        raise SystemExit(f"--no-train: {cell_dir / RUN} holds no trained model; train it first "
                         "(drop --no-train)")
    if (cell_dir / OUTPUT).is_file() and not (cell_dir / TRAIN_OUTPUT).is_file():
        (cell_dir / OUTPUT).rename(cell_dir / TRAIN_OUTPUT)
    lines = ((cell_dir / TRAIN_OUTPUT).read_text().splitlines()
             if (cell_dir / TRAIN_OUTPUT).is_file() else [])
    for line in lines:
        if line.startswith("$ ") and " flowlab.cli train " in line:
            return "flowlab " + line.split(" flowlab.cli ", 1)[1]
    return f"(trained earlier: see {cell_dir / RUN / 'config.json'})"


def run_cell(method: str, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """Train, evaluate and measure one cell in subprocesses; write and return its cell.json."""
    from flowlab.train.checkpoint import atomic_write_json

    cell_dir = args.runs / method
    cell_dir.mkdir(parents=True, exist_ok=True)
    train_command = ("flowlab " + shlex.join(train_options(method, args, cell_dir / RUN, threads))
                     if not args.no_train else earlier_training(cell_dir))
    for name in (CELL, MEASURE):
        (cell_dir / name).unlink(missing_ok=True)
    budget = args.seconds
    if args.no_train:  # the budget the run was trained with, not this invocation's --seconds
        from flowlab.train.checkpoint import read_run_config

        budget = read_run_config(cell_dir / RUN)["train"].get("seconds") or budget
    base = {"method": method, "dataset": args.data, "budget": budget,
            "jobs": args.jobs, "threads": threads, "machine": machine_line(),
            "train_command": train_command, "eval_args": args.eval_args}
    start = time.perf_counter()
    error = run_steps(cell_commands(method, args, cell_dir, threads), cell_dir / OUTPUT, method)
    if error is not None:
        cell = {**base, "error": error, "wall_seconds": time.perf_counter() - start}
        atomic_write_json(cell_dir / CELL, cell)
        print(f"{method:>18}: FAILED ({cell['error']})", flush=True)
        return cell
    evaluation = json.loads((cell_dir / RUN / "eval.json").read_text())
    measured = json.loads((cell_dir / MEASURE).read_text())
    cell = {**base, "error": None, **{k: evaluation.get(k) for k in (
        "bits_per_dim", "bpd_se", "n_test", "n_total", "nfe", "estimator", "solver", "probes",
        "estimator_se")}, "eval_seconds": evaluation["seconds"], **measured,
        "wall_seconds": time.perf_counter() - start}
    atomic_write_json(cell_dir / CELL, cell)
    print(f"{method:>18}: {cell['bits_per_dim']:.4f} ± {cell['bpd_se']:.4f} bits/dim on "
          f"{cell['n_test']} test images, {cell['train_steps']} steps, "
          f"{cell['parameters']:,} parameters", flush=True)
    return cell


def load_cells(runs: Path, published: list[dict] | None = None) -> dict[str, dict]:
    """The finished cells under ``runs`` by method. ``published``: the cells of a results json
    written before (``--merge``); a cell finished under ``runs`` replaces the published one."""
    cells = {cell["method"]: cell for cell in published or ()}
    for path in sorted(Path(runs).glob(f"*/{CELL}")):
        cell = json.loads(path.read_text())
        cells[cell["method"]] = cell
    return cells


# -- report ------------------------------------------------------------------------------------
def _ok(cell: dict | None) -> bool:
    return cell is not None and cell.get("error") is None


def _ordered(cells: dict) -> list[dict]:
    return [cells[m] for m in METHODS if m in cells]


def results_table(cells: dict) -> str:
    lines = ["| method | test bits/dim ± s.e. | estimator s.e. | test images | parameters "
             "| steps | train s | selected at (s) | NFE (eval, per batch) | eval s "
             "| sampling s / 64 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in _ordered(cells):
        if not _ok(c):
            error = str(c["error"]).replace("|", "/")
            lines.append(f"| {c['method']} | failed: {error} " + "| - " * 9 + "|")
            continue
        est = c.get("estimator_se")
        stochastic = c.get("estimator") not in ("exact", "closed form", None)
        est_text = ("-" if not stochastic
                    else f"{est:.4f} ({c.get('probes')} probes)" if est is not None
                    and (c.get("probes") or 1) > 1 else "n/a (1 probe)")
        nfe = "-" if c.get("nfe") is None else f"{c['nfe']:.0f}"
        best = c.get("best")
        chosen = "last" if best is None else f"{best['seconds']:.0f}"
        lines.append(
            f"| {c['method']} | {c['bits_per_dim']:.4f} ± {c['bpd_se']:.4f} | {est_text} "
            f"| {c['n_test']:,} of {c['n_total']:,} | {c['parameters']:,} "
            f"| {c['train_steps']:,} | {c['train_seconds']:.0f} | {chosen} | {nfe} "
            f"| {c['eval_seconds']:.0f} | {c['sample_seconds']:.2f} |")
    return "\n".join(lines)


def verdict(cells: dict) -> str:
    """Whether the best CNF beats the best discrete baseline (by more than 2 s.e.)."""
    ok = [c for c in _ordered(cells) if _ok(c)]
    cnfs = [c for c in ok if c["method"].startswith(("ffjord", "cfm"))]
    base = [c for c in ok if c["method"] in BASELINES]
    if not cnfs or not base:
        return "Not enough finished cells to compare a CNF with the discrete baselines."
    best, rival = min(cnfs, key=lambda c: c["bits_per_dim"]), min(
        base, key=lambda c: c["bits_per_dim"])
    diff = best["bits_per_dim"] - rival["bits_per_dim"]
    se = math.hypot(best["bpd_se"], rival["bpd_se"])
    word = ("beats" if diff < -2 * se else "loses to" if diff > 2 * se
            else "is within 2 s.e. of")
    if best["n_test"] == rival["n_test"]:
        caveat = "the images are the same, so this errs on the lenient side"
    else:
        caveat = (f"scored on different test images, {best['n_test']:,} and "
                  f"{rival['n_test']:,}: not a paired comparison")
    return (f"Best CNF `{best['method']}` ({best['bits_per_dim']:.4f}) {word} the best "
            f"discrete baseline `{rival['method']}` ({rival['bits_per_dim']:.4f}): difference "
            f"{diff:+.4f} ± {se:.4f} bits/dim (s.e.s over images combined in quadrature; "
            f"{caveat}).")


def report(cells: dict, data: str, command: str, figure: str | None,
           results_dir: Path = Path()) -> str:
    ok = [c for c in _ordered(cells) if _ok(c)]
    budgets = sorted({c["budget"] for c in cells.values()})
    machines = sorted({c.get("machine", "?") for c in cells.values()})
    threads = sorted({c.get("threads", 1) for c in cells.values()})
    task = re.sub(r", (flat|image) layout", "", ok[0]["task"]) if ok else data
    layouts: dict[str, list[str]] = {}
    for c in ok:  # each model sees the images in its own layout
        found = re.search(r"(flat|image) layout", c.get("task", ""))
        layouts.setdefault(found.group(1) if found else "?", []).append(c["method"])
    layout_text = "; ".join(f"{LAYOUT_WORDS.get(k, k)}: {', '.join(v)}"
                            for k, v in sorted(layouts.items()))
    return "\n".join([
        f"# Image models on {data} at a fixed budget",
        "",
        f"Command: `{command}`  ",
        f"Data: {task}.  ",
        *([f"Layout: {layout_text}.  "] if layout_text else []),
        f"Machine: {'; '.join(machines)}; {'/'.join(map(str, threads))} torch thread(s) per "
        "process.  ",
        f"Budget: {', '.join(f'{b:g}' for b in budgets)} s of training clock per method "
        "(validation, logging and checkpoints excluded).  ",
        "Test bits/dim: the whole test split unless the table says otherwise, uniform "
        "dequantization with the fixed test seed (an upper bound on the discrete data's "
        "bits/dim); ± one s.e. over test images. CNFs: by the ODE at evaluation tolerances; "
        "with Hutchinson's estimator the per-image value is averaged over the probes and the "
        "estimator's own s.e. is given separately.",
        "",
        results_table(cells),
        "",
        verdict(cells),
        "",
        *([f"![validation bits/dim against training time]({figure})", ""] if figure else []),
        "Training command of each method:",
        "",
        *[f"- {c['method']}: `{c['train_command']}`"
          + (f", evaluated with `{c['eval_args']}`" if c.get("eval_args") else "")
          for c in _ordered(cells) if c.get("train_command")],
        "",
        "Samples: " + ", ".join(
            f"[{c['method']}](images_{data}_samples_{c['method']}.png)" for c in ok) + ".  ",
        "Interpolations in the base space, and the GIF of test images carried to noise and "
        "back (CNFs): " + ", ".join(
            f"[{Path(name).stem} {c['method']}]({picture_name(data, name, c['method'])})"
            for c in ok for name in PICTURES
            if (results_dir / picture_name(data, name, c["method"])).is_file()) + ".",
        "",
    ])


def plot(cells: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    ok = [c for c in _ordered(cells) if _ok(c)]
    for c in ok:
        if c["curve"]:
            seconds, bpd = zip(*c["curve"], strict=True)
            left.plot(seconds, bpd, label=c["method"])
    left.set_xlabel("training seconds")
    left.set_ylabel("validation bits/dim")
    left.set_title("validation bits/dim during training")
    finite = [b for c in ok for _, b in c["curve"] if math.isfinite(b)]
    if finite:
        low = min(finite)
        left.set_ylim(low - 0.05, low + max(1.0, 0.25 * (max(finite) - low)) + 0.05)
    left.legend(fontsize=8)
    names = [c["method"] for c in ok]
    left.grid(alpha=0.3)
    right.errorbar([c["bits_per_dim"] for c in ok], range(len(ok)),
                   xerr=[2 * c["bpd_se"] for c in ok], fmt="o", capsize=4)
    right.set_yticks(range(len(ok)), names)
    right.invert_yaxis()
    right.grid(alpha=0.3)
    right.set_xlabel("test bits/dim (± 2 s.e.)")
    right.set_title("test bits/dim")
    if ok:
        values = [c["bits_per_dim"] for c in ok]
        right.set_xlim(min(values) - 0.2, max(values) + 0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(cells: dict, data: str, runs: Path, results: Path, command: str) -> str:
    results.mkdir(parents=True, exist_ok=True)
    stem = f"images_{data}"
    figure = results / f"{stem}.png"
    plot(cells, figure)
    for c in _ordered(cells):
        grid = runs / c["method"] / "samples.png"
        if _ok(c) and grid.is_file():
            shutil.copyfile(grid, results / f"{stem}_samples_{c['method']}.png")
        for name in PICTURES:  # written by `flowlab plot RUN`
            picture = runs / c["method"] / RUN / name
            if _ok(c) and picture.is_file():
                shutil.copyfile(picture, results / picture_name(data, name, c["method"]))
    text = report(cells, data, command, figure.name, results)
    (results / f"{stem}.md").write_text(text)
    (results / f"{stem}.json").write_text(json.dumps(
        {"command": command, "cells": _ordered(cells)}, indent=1))
    return text


# -- the driver --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seconds", type=float, default=900.0,
                        help="training budget per method (seconds of training clock)")
    parser.add_argument("--jobs", type=int, default=1, help="methods trained at a time")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: CPUs / jobs)")
    parser.add_argument("--n-test", type=int, default=None,
                        help="score a random subset of test images (default: all)")
    parser.add_argument("--train-args", default=None,
                        help="more `flowlab train` options for every method, after the "
                             "method's own (later options win), e.g. \"--batch-size 64 "
                             "--lr 1e-3\"")
    parser.add_argument("--eval-args", default=None,
                        help="more `flowlab eval` options, e.g. \"--divergence hutchinson "
                             "--probes 2\" for a CNF whose exact trace is too dear (MNIST)")
    parser.add_argument("--no-train", action="store_true",
                        help="evaluate, measure and plot the cells' trained runs again (e.g. "
                             "with other --eval-args) without training them")
    parser.add_argument("--no-keep-best", action="store_true",
                        help="no model selection on the validation split (for models whose "
                             "validation by the ODE costs more than the budget can spare, "
                             "e.g. a CNF on MNIST on a CPU): the final weights are evaluated")
    parser.add_argument("--probes", type=int, default=None,
                        help="Hutchinson probes per test image for ffjord-multiscale (the CNF "
                             "evaluated with Hutchinson's estimator; default: eval's, 4)")
    parser.add_argument("--runs", type=Path, default=None,
                        help="cell folders (default runs/images/DATA)")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--force", action="store_true", help="rerun finished cells")
    parser.add_argument("--table-only", action="store_true",
                        help="rebuild the report from the finished cells")
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
        atomic_write_json(Path(cell_dir) / MEASURE,
                          measure(method, Path(cell_dir), args.threads or 1))
        return
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if not (args.seconds > 0) or args.jobs < 1:
        parser.error("--seconds must be positive and --jobs at least 1")
    args.runs = args.runs or Path("runs/images") / args.data
    published = published_results(parser, args.results / f"images_{args.data}.json", args.merge)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    if not args.table_only:
        todo = [m for m in methods
                if args.force or args.no_train or not (args.runs / m / CELL).is_file()]
        print(f"{len(todo)} methods on {args.data}, {args.seconds:g} s each, {args.jobs} at a "
              f"time with {threads} thread(s) each", flush=True)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda m: run_cell(m, args, threads), todo))
    cells = load_cells(args.runs, published["cells"] if published else None)
    if not cells:
        raise SystemExit(f"no finished cells under {args.runs}")
    command = "python benchmarks/images.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv) if a != "--table-only")
    print(write_results(cells, args.data, args.runs, args.results,
                        chained_command(published, command)))


if __name__ == "__main__":
    main()
