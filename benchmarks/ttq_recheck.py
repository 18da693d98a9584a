"""A close verdict of the time-to-quality benchmark, measured again on more test points.

``time_to_quality.py`` judges each method by the final paired KL of its training runs on one
fixed set of 20,000 points. Where two methods end within a few ten-thousandths of a nat, that
set's own noise (about ± 0.0005 per run on 8gaussians, largely independent from run to run,
because every model errs at different places) is as large as the difference being judged. This
script takes the final models of the runs that a benchmark left in its runs folder, evaluates
each on ``--points`` fresh points of the true density (drawn with a seed of their own, not the
benchmark's test set; dopri5 at 1e-6, float64, the exact divergence), and reports:

- each run's paired KL(data || model) ± its s.e. over the points;
- each method's mean over its runs, with the s.e. over runs (which holds both the training
  spread and what is left of the points' noise);
- each method trained for a tenth of FFJORD's budget against FFJORD: the difference of the
  means over runs, with the s.e. of two independent means, and the verdict, computed by
  ``time_to_quality.py``'s own rule (reached when the mean is no larger).

The per-point log-densities are cached next to each run (``recheck-<points>-<seed>.pt``, with
the final snapshot they came from), so a second call only aggregates. Usage (after the
benchmark has trained the runs)::

    python benchmarks/ttq_recheck.py --runs runs/ttq-sob --dataset 8gaussians \\
        --seeds 0,1,2,3,4 --methods ffjord,cfm-avg-sob-fourier-ema-60s --points 60000 --jobs 2
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

POINTS_SEED = 7_777  # not the benchmark's test seed: these points are new to every model
TOLERANCE = 1e-6
BATCH = 5_000


def cache_path(run: Path, points: int, seed: int) -> Path:
    return run / f"recheck-{points}-{seed}.pt"


def model_log_probs(run: Path, method: str, dataset_name: str, points: int, seed: int) -> str:
    """Evaluate the final model of ``run`` on the fresh points and cache log q per point."""
    import torch
    from time_to_quality import _flowlab_model, _snapshot_index

    from flowlab.data import get_dataset
    from flowlab.eval import heldout_points
    from flowlab.ode import SolverConfig

    torch.set_num_threads(1)
    out = cache_path(run, points, seed)
    final = _snapshot_index(run, method)[-1]
    snapshot = {"file": final["file"], "step": final.get("step")}
    if out.is_file() and torch.load(out)["snapshot"] == snapshot:
        return f"{run}: cached"  # (a run trained again has another final step: evaluated anew)
    dataset = get_dataset(dataset_name)
    x = heldout_points(dataset, points, seed=seed)
    model = _flowlab_model(run, final["file"])
    solver = SolverConfig(atol=TOLERANCE, rtol=TOLERANCE)
    start = time.perf_counter()
    values = []
    with torch.no_grad():
        for chunk in x.split(BATCH):
            values.append(model.log_prob_with_stats(chunk, solver=solver)[0].double().cpu())
    log_q = torch.cat(values)
    if torch.isnan(log_q).any():
        raise SystemExit(f"{run}: {int(torch.isnan(log_q).sum())} log-densities are NaN")
    partial = out.with_suffix(".partial")
    torch.save({"log_q": log_q, "snapshot": snapshot}, partial)
    partial.replace(out)  # never a half-written cache
    return f"{run}: {points:,} points in {time.perf_counter() - start:.0f} s"


def summarize(runs_by_method: dict[str, dict[int, Path]], dataset_name: str, points: int,
              seed: int) -> str:
    """The Markdown report from the cached log-densities; the verdict is the benchmark's own
    (:func:`time_to_quality.replicated_verdict`) on these KLs."""
    import torch
    from time_to_quality import BUDGETS, _mean_se, replicated_verdict

    from flowlab.data import get_dataset
    from flowlab.eval import heldout_points
    from flowlab.eval.nll import mean_and_se

    dataset = get_dataset(dataset_name)
    x = heldout_points(dataset, points, seed=seed)
    log_p = torch.cat([dataset.log_prob(c).double() for c in x.split(BATCH)])
    lines = [f"Final models re-evaluated on {points:,} fresh points of {dataset_name} (seed "
             f"{seed}), dopri5 at {TOLERANCE:g}, float64, exact divergence. Paired "
             "KL(data || model) in nats, ± 1 s.e.", "",
             "| method | KL by training seed | mean ± s.e. over runs |", "|---|---|---|"]
    replicates = {}
    for method, runs in runs_by_method.items():
        kls = {s: mean_and_se(log_p - torch.load(cache_path(run, points, seed))["log_q"])
               for s, run in runs.items()}
        replicates[method] = {s: {"kl_nats": kl} for s, (kl, _) in kls.items()}
        cells = ", ".join(f"{s}: {k:.4f} ± {e:.4f}" for s, (k, e) in kls.items())
        over = "-"
        if len(kls) > 1:
            runs_mean = _mean_se([k for k, _ in kls.values()])
            over = f"{runs_mean['mean']:.4f} ± {runs_mean['se']:.4f}"
        lines.append(f"| {method} | {cells} | {over} |")
    verdict = replicated_verdict({}, replicates, BUDGETS[-1])
    lines.append("")
    if verdict is None:
        lines.append("No verdict: it needs FFJORD and a method trained for a tenth of its "
                     "budget, with three runs or more each.")
        return "\n".join(lines)
    for method, mine in verdict["methods"].items():
        lines.append(f"- {method} against ffjord: {mine['diff']:+.4f} ± {mine['diff_se']:.4f} "
                     f"nats over runs: {'reached' if mine['reaches'] else 'not reached'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from time_to_quality import FLOWLAB_METHODS, PRETRAIN, replicate_folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True,
                        help="the runs folder of a time_to_quality.py benchmark")
    parser.add_argument("--dataset", default="8gaussians")
    parser.add_argument("--methods", default="ffjord,cfm-avg-sob-fourier-ema-60s")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--points", type=int, default=60_000)
    parser.add_argument("--points-seed", type=int, default=POINTS_SEED)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds takes whole numbers separated by commas, got {args.seeds!r}")
    if args.points < 2:
        parser.error(f"--points must be at least 2, got {args.points}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    refused = [m for m in methods if m not in FLOWLAB_METHODS or m in PRETRAIN]
    if refused or not methods:
        parser.error(f"--methods takes flowlab's one-part methods of time_to_quality.py (the "
                     f"ones trained with several seeds), not {', '.join(refused) or 'nothing'}")
    runs = {m: {s: replicate_folder(args.runs, args.dataset, m, s) for s in seeds}
            for m in methods}
    missing = [str(r) for by_seed in runs.values() for r in by_seed.values()
               if not (r / "snapshots").is_dir()]
    if missing:
        parser.error("no finished run in " + ", ".join(missing) + ": train them first with "
                     "benchmarks/time_to_quality.py (the same --runs, --datasets and --seeds)")
    jobs = [(run, m, args.dataset, args.points, args.points_seed)
            for m, by_seed in runs.items() for run in by_seed.values()]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for message in pool.map(model_log_probs, *zip(*jobs, strict=True)):
            print(message, flush=True)
    command = "python benchmarks/ttq_recheck.py " + " ".join(
        a for a in (sys.argv[1:] if argv is None else argv))
    report = (f"# A close verdict measured again: {args.dataset}\n\nCommand: `{command}`  \n"
              f"Machine: {platform.machine()}, Python {platform.python_version()}, "
              f"{args.jobs} evaluation(s) at a time, one thread each.\n\n"
              + summarize(runs, args.dataset, args.points, args.points_seed))
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
