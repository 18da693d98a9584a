"""Cost of one FFJORD training step by gradient strategy: backprop, adjoint, adjoint+seminorm.

Side by side in one process, on the same model and batches, after a short warm-up training so
that the dynamics are no longer trivial. Reports the median seconds per step over several
repeats, forward and backward NFE, and the ratios to backprop. This is the measurement behind
the CLI's default (`--no-adjoint`): on small CPU models backprop through the solver is faster;
the adjoint's advantage is memory that does not grow with the number of solver steps.

Usage: ``python benchmarks/ode_gradients.py [--warmup-steps 300] [--repeats 15]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from flowlab.data import get_dataset
from flowlab.models import FFJORD
from flowlab.ode import SolverConfig
from flowlab.train import TrainConfig, train

STRATEGIES = {
    "backprop": SolverConfig(gradient="backprop"),
    "adjoint": SolverConfig(gradient="adjoint"),
    "adjoint+seminorm": SolverConfig(gradient="adjoint", seminorm=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="8gaussians")
    parser.add_argument("--warmup-steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = get_dataset(args.data)
    base = FFJORD(2)
    train(base, lambda n, g: data.sample(n, generator=g),
          TrainConfig(iters=args.warmup_steps, batch_size=args.batch_size), progress=False)
    batches = [data.sample(args.batch_size, generator=torch.Generator().manual_seed(i))
               for i in range(args.repeats)]
    results = {name: {"seconds": [], "nfe_f": [], "nfe_b": []} for name in STRATEGIES}
    models = {}
    for name, solver in STRATEGIES.items():
        model = copy.deepcopy(base)
        model.solver = solver
        models[name] = model
    for batch in batches:  # interleave strategies so that machine noise hits all alike
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            out = model.training_loss(batch)
            out.loss.backward()
            results[name]["seconds"].append(time.perf_counter() - start)
            results[name]["nfe_f"].append(sum(s.nfe_forward for s in out.stats))
            results[name]["nfe_b"].append(sum(s.nfe_backward for s in out.stats))
    reference = statistics.median(results["backprop"]["seconds"])
    lines = [
        f"# Training-step cost by gradient strategy ({args.data}, batch {args.batch_size}, "
        f"after {args.warmup_steps} warm-up steps, one CPU thread)\n",
        f"Command: `python benchmarks/ode_gradients.py --warmup-steps {args.warmup_steps} "
        f"--repeats {args.repeats}`; medians over {args.repeats} interleaved repeats.\n",
        "| gradient | s/step (median) | ratio to backprop | NFE forward | NFE backward |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        med = statistics.median(r["seconds"])
        lines.append(f"| {name} | {med:.3f} | {med / reference:.2f} | "
                     f"{statistics.median(r['nfe_f']):.0f} | {statistics.median(r['nfe_b']):.0f} |")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ode_gradients.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
