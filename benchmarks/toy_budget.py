"""One model configuration on the eight 2-D densities under one fixed training budget.

Each dataset is trained and evaluated through the `flowlab` command line exactly as a user
would run it (`flowlab train ... --seconds S`, `flowlab eval`, `flowlab plot`), so the table
measures the shipped defaults. Arguments after ``--`` go to `flowlab train` unchanged.
Writes ``benchmarks/results/NAME.md`` (dataset, budget, test NLL +- s.e., true entropy H,
gap, NFE per training step and at evaluation, seconds), a JSON file with the same rows, and
each run's density plots.

Usage (from the repository root, after the README's install step)::

    python benchmarks/toy_budget.py --seconds 600 --jobs 2                  # FFJORD, ML
    python benchmarks/toy_budget.py --seconds 300 --jobs 2 --name otcfm_toy -- \
        --model cfm --coupling ot                                           # OT-CFM

``--jobs 2`` trains two datasets at a time; each process uses one CPU thread (for these 2-D
models one thread is as fast as two, measured), so on a 2-core machine this halves the wall
time without changing per-run speed much. Use ``--jobs 1`` for the most faithful timings.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DATASETS = ("8gaussians", "checkerboard", "2spirals", "pinwheel", "rings", "circles", "moons",
            "swissroll")
ROOT = Path(__file__).resolve().parent


def run_one(name: str, seconds: float, runs: Path, extra: list[str], plots: bool) -> dict:
    """Train, evaluate and plot one dataset through the CLI; return its table row."""
    run_dir = runs / name
    flowlab = [sys.executable, "-m", "flowlab.cli"]
    subprocess.run(
        [*flowlab, "train", "--data", name, "--seconds", str(seconds), "--out", str(run_dir),
         "--force", "--no-progress", *extra],
        check=True, stdout=subprocess.DEVNULL,
    )
    subprocess.run([*flowlab, "eval", str(run_dir), "--threads", "1"], check=True,
                   stdout=subprocess.DEVNULL)
    if plots:
        subprocess.run([*flowlab, "plot", str(run_dir), "--no-gif"], check=True,
                       stdout=subprocess.DEVNULL)
    row = collect(run_dir)
    print(f"{name:>12}: NLL {row['nll_nats']:.4f} ± {row['nll_se']:.4f}  "
          f"H {row['entropy_nats']:.4f}  gap {row['gap_nats']:+.4f} nats", flush=True)
    return row


def collect(run_dir: Path) -> dict:
    """The table row of a finished run folder (its eval.json, config and training log)."""
    row = json.loads((run_dir / "eval.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    train_nfe = [r["nfe_forward"] for r in log if "nfe_forward" in r]
    row.update(
        budget_seconds=config["train"]["seconds"],
        train_steps=log[-1]["step"] if log else 0,
        train_seconds=log[-1]["seconds"] if log else 0.0,
        nfe_train_median=statistics.median(train_nfe) if train_nfe else float("nan"),
        nfe_train_last=train_nfe[-1] if train_nfe else float("nan"),
    )
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| dataset | budget (s) | steps | test NLL ± s.e. (nats) | H (nats) | gap NLL-H (nats) "
        "| KL paired ± s.e. (nats) | NFE/train step (median, last) | NFE eval | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kl = f"{r['kl_nats']:.4f} ± {r['kl_se']:.4f}" if r.get("kl_nats") is not None else "-"
        lines.append(
            f"| {r['dataset']} | {r['budget_seconds']:.0f} | {r['train_steps']} "
            f"| {r['nll_nats']:.4f} ± {r['nll_se']:.4f} | {r['entropy_nats']:.4f} "
            f"| {r['gap_nats']:+.4f} | {kl} "
            f"| {r['nfe_train_median']:.0f}, {r['nfe_train_last']:.0f} "
            f"| {r['nfe']:.0f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="training budget per dataset")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--jobs", type=int, default=1, help="datasets trained at once")
    parser.add_argument("--name", default="ffjord_toy",
                        help="results file stem; runs go to runs/bench-NAME unless --runs")
    parser.add_argument("--runs", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--table-only", action="store_true",
                        help="rebuild the table from the finished run folders in --runs")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    args.runs = args.runs or Path(f"runs/bench-{args.name}")
    names = [n for n in args.datasets.split(",") if n]
    args.runs.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        rows = [collect(args.runs / n) for n in names]
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            rows = list(pool.map(
                lambda n: run_one(n, args.seconds, args.runs, extra, not args.no_plots), names
            ))
    command = "python benchmarks/toy_budget.py " + " ".join(
        a for a in sys.argv[1:] if a != "--table-only"
    )
    config = json.loads((args.runs / names[0] / "config.json").read_text())
    options = config["model_options"]
    described = f"{config['model']} (hidden {options.get('hidden')}" + (
        f", coupling {options['coupling']})" if "coupling" in options else ")")
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, Python " \
              f"{platform.python_version()}"
    text = (
        f"# {described} on the 2-D densities\n\n"
        f"Budget: {rows[0]['budget_seconds']:.0f} s of training per dataset.  \n"
        f"Command: `{command}`  \nMachine: {machine}; {args.jobs} job(s) at a time, one torch "
        f"thread each.  \nTest NLL on 20,000 fresh points, exact divergence, dopri5 at "
        f"atol=rtol=1e-6 in float64.\n\n{table(rows)}\n"
    )
    (args.results / f"{args.name}.md").write_text(text)
    (args.results / f"{args.name}.json").write_text(json.dumps(rows, indent=2))
    if not args.no_plots:
        for name in names:
            src = args.runs / name / "density.png"
            if src.is_file():
                shutil.copy(src, args.results / f"{args.name}_{name}.png")
    print(text)


if __name__ == "__main__":
    main()
