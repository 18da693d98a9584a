"""What the averaged flow-matching target costs per training step, against the conditional one.

``flowlab train --model cfm --target averaged`` replaces each pair's velocity by its posterior
average over the batch (:mod:`flowlab.fm.targets`): one n x n softmax in float64 per step. In
a fixed budget the number of steps sets the result, so the cost is measured here, side by side
in one process: two models of the same architecture (the Fourier-feature field, 256 x 4 swish,
as ``--field fourier`` builds it), one per target, trained on the same 8gaussians batch,
interleaved in blocks of ``--steps`` steps so that machine noise hits both alike.

Usage: ``python benchmarks/fm_target_cost.py [--repeats 7] [--steps 50] [--batch-size 512]
[--threads 1]``; writes ``benchmarks/results/fm_target_cost.md``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from flowlab.data import get_dataset
from flowlab.models import CFM

ROOT = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50, help="steps per timed block")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = get_dataset("8gaussians").sample(args.batch_size, torch.Generator().manual_seed(1))
    targets = ("conditional", "averaged")
    models = {t: CFM(2, hidden=(256,) * 4, field="fourier", activation="swish", target=t)
              for t in targets}
    optimizers = {t: torch.optim.Adam(m.parameters(), lr=1e-3) for t, m in models.items()}
    times: dict[str, list[float]] = {t: [] for t in targets}
    for repeat in range(args.repeats + 1):  # the first block of each warms up, not counted
        for target in targets:
            model, optimizer = models[target], optimizers[target]
            start = time.perf_counter()
            for _ in range(args.steps):
                loss = model.training_loss(batch).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if repeat:
                times[target].append((time.perf_counter() - start) / args.steps * 1e3)
    median = {t: statistics.median(v) for t, v in times.items()}
    lines = [
        "# Cost of the averaged flow-matching target",
        "",
        f"Command: `python benchmarks/fm_target_cost.py --repeats {args.repeats} --steps "
        f"{args.steps} --batch-size {args.batch_size} --threads {args.threads}`  ",
        f"Machine: {platform.machine()}, Python {platform.python_version()}, torch "
        f"{torch.__version__}, {args.threads} thread(s).",
        "",
        "Milliseconds per training step (forward, backward, Adam) of the Fourier-feature field "
        f"on a batch of {args.batch_size} 8gaussians points, median of {args.repeats} blocks of "
        f"{args.steps} steps, the two targets interleaved:",
        "",
        "| target | ms per step (median) | blocks |",
        "|---|---|---|",
        *(f"| {t} | {median[t]:.2f} | {', '.join(f'{v:.2f}' for v in times[t])} |"
          for t in targets),
        "",
        f"The averaged target adds {median['averaged'] - median['conditional']:.2f} ms a step "
        f"({median['averaged'] / median['conditional']:.2f} times the conditional step).",
        "",
    ]
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "fm_target_cost.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
