"""How noisy the flow-matching gradient is with each target, and how much of that noise the
rows of a batch share.

On 8gaussians the marginal velocity of the linear path is known in closed form
(:mod:`fm_target_noise`). For a trained field and each time of a grid, every row of a batch
is put at that time and the gradient of the batch loss with respect to the field's
parameters is drawn ``--batches`` times; the table gives its noise ``E|g - E g|^2`` (the
trace of its covariance) for these losses:

- ``conditional``: regression on the conditional velocity ``(1 - sigma_min) z - x``;
- ``averaged``: regression on the batch-posterior average of :mod:`flowlab.fm.targets`,
  with the batch as the reference set;
- ``fresh blocks``: the same average, but each block of ``--block`` rows averages over its
  own data point and ``--references`` data points drawn for that block alone. Each row's
  error is about that of the batch average; the errors of different blocks are independent,
  where with the batch as the reference set every row's error comes from the same 512 points;
- ``score matching``: the implicit score-matching loss of ``p_t`` (below), which has no
  target at all;
- ``exact``: regression on the exact velocity: the noise of drawing the points alone.

Beside them: the squared norm of the mean gradient of the exact regression (the signal the
noise is measured against) and the per-row squared error of each target.

The score-matching loss. With ``x_t = a x + sigma z`` the marginal velocity is
``u = alpha y + beta s(y)``, where ``s`` is the score of ``p_t``, ``alpha = a' / a`` and
``beta = a' sigma^2 / a - sigma' sigma`` (Tweedie's formula; on the linear path ``a' = -1``,
``sigma' = 1 - sigma_min``). Integrating ``E[s . v]`` by parts gives, up to a term free of
``v``,

    E|v(y) - u(y)|^2 = E[ |v(y) - alpha y|^2 + 2 beta div v(y) ],

the expectation over ``y ~ p_t``: the right side has the gradient of the regression on the
exact velocity, with no target noise (Hyvarinen 2005, for the score). The divergence is taken
here by central differences along a Rademacher probe. Near the data end ``beta`` is of order
``t``, so its noise vanishes there, where every target is the noisiest.

Usage: ``python benchmarks/fm_gradient_noise.py RUN [--batch-size 512] [--batches 40]
[--block 64] [--references 512]``; writes ``benchmarks/results/fm_gradient_noise.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from flowlab.data import get_dataset
from flowlab.fm.paths import LinearPath
from flowlab.fm.targets import averaged_velocity, path_gaussian
from flowlab.train.checkpoint import load_model

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from fm_target_noise import (  # noqa: E402
    exact_velocity,
    path_scales,
    posterior_average,
    report_head,
    write_report,
)

TIMES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
LOSSES = ("conditional", "averaged", "fresh blocks", "score matching", "exact")
STEP = 1e-3  # central-difference step of the divergence (data units; float64)


def fresh_block_velocity(path: LinearPath, x: torch.Tensor, z: torch.Tensor, t: float,
                         references: torch.Tensor) -> torch.Tensor:
    """The posterior-average target with a reference set per block of rows.

    Args:
        x, z: the rows' data points and noise, ``(n, d)``, all at time ``t``.
        references: ``(blocks, size, d)`` data points; block ``b`` holds rows
            ``b * n / blocks`` to ``(b + 1) * n / blocks - 1``.

    Row ``i`` averages the conditional velocities over its own data point and its block's
    references, weighted by ``N(x_t; a x_j, sigma^2 I)``.
    """
    a, sigma = path_scales(path, t)
    size = x.shape[0] // references.shape[0]
    points = torch.cat([x[:, None], references.repeat_interleave(size, dim=0)], 1)
    return posterior_average(path, a * x + sigma * z, t, points)


def score_matching_rows(field, path: LinearPath, t: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator) -> torch.Tensor:
    """Per-row implicit score-matching loss ``|v - alpha y|^2 + 2 beta div v`` (module
    docstring), the divergence by central differences along one Rademacher probe per row."""
    a, sigma, _ = (v.reshape(-1, 1) for v in path_gaussian(path, t))
    alpha = -1 / a
    beta = -sigma**2 / a - (1 - path.sigma_min) * sigma
    probe = torch.randint(0, 2, y.shape, generator=generator).to(y) * 2 - 1
    v = field(t, y)
    difference = field(t, y + STEP * probe) - field(t, y - STEP * probe)
    divergence = (probe * difference).sum(1, keepdim=True) / (2 * STEP)
    return ((v - alpha * y).pow(2).sum(1, keepdim=True) + 2 * beta * divergence).squeeze(1)


def gradient_noise(data, path: LinearPath, field, batch_size: int, batches: int, block: int,
                   references: int, seed: int = 0) -> list[dict]:
    """Per time: the noise of each loss's batch gradient, the exact regression's squared mean
    gradient (``signal``) and each target's per-row squared error (``mse ...``)."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in field.parameters() if p.requires_grad]

    def gradient(loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        return torch.cat([g.flatten() for g in grads])

    rows = []
    for t in TIMES:
        grads = {name: [] for name in LOSSES}
        mse = {name: 0.0 for name in ("conditional", "averaged", "fresh blocks")}
        for _ in range(batches):
            x = data.sample(batch_size, generator=generator).to(torch.float64)
            z = torch.randn(x.shape, generator=generator, dtype=torch.float64)
            times = torch.full((batch_size,), t, dtype=torch.float64)
            y, conditional = path.point_and_velocity(x, z, times)
            pool = data.sample(batch_size // block * references, generator=generator)
            targets = {
                "conditional": conditional,
                "averaged": averaged_velocity(path, x, z, times, conditional),
                "fresh blocks": fresh_block_velocity(
                    path, x, z, t,
                    pool.to(torch.float64).reshape(batch_size // block, references, -1)),
                "exact": exact_velocity(data.centres, data.std, path, y, t),
            }
            v = field(times, y)
            for name, target in targets.items():
                grads[name].append(gradient((v - target).pow(2).sum(1).mean()))
                if name in mse:
                    mse[name] += (target - targets["exact"]).pow(2).sum(1).mean().item() / batches
            sm = score_matching_rows(field, path, times, y, generator).mean()
            grads["score matching"].append(gradient(sm))
        row = {"t": t}
        for name, draws in grads.items():
            draws = torch.stack(draws)
            mean = draws.mean(0)
            row[name] = (draws - mean).pow(2).sum(1).mean().item()
            if name == "exact":
                row["signal"] = mean.pow(2).sum().item()
        row.update({f"mse {name}": value for name, value in mse.items()})
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a flowlab cfm run folder trained on 8gaussians")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--block", type=int, default=64,
                        help="rows per block of the fresh-block target")
    parser.add_argument("--references", type=int, default=512,
                        help="fresh data points per block")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    if args.batches < 2:
        parser.error(f"--batches must be at least 2 to measure a spread, got {args.batches}")
    if args.block < 1 or args.batch_size % args.block:
        parser.error(f"--block must divide --batch-size ({args.batch_size}), got {args.block}")
    if args.references < 1:
        parser.error(f"--references must be positive, got {args.references}")
    torch.set_num_threads(1)
    data = get_dataset("8gaussians")
    path = LinearPath()
    model = load_model(args.run / "model.safetensors").double().eval()
    if getattr(model, "path", None) != path:
        parser.error(f"{args.run}: not a flow-matching model on the linear path with sigma_min "
                     f"{path.sigma_min} (the exact velocity here is that path's)")
    rows = gradient_noise(data, path, model.blocks[0].field, args.batch_size, args.batches,
                          args.block, args.references)
    lines = [
        "# The noise of the flow-matching gradient, target by target",
        "",
        *report_head("fm_gradient_noise.py", argv),
        "",
        f"Field: `{args.run}`. 8gaussians, linear path (sigma_min {path.sigma_min:g}); every "
        f"row of a batch of {args.batch_size} at the time t; {args.batches} batches per time. "
        "Noise E|g - E g|^2 of the batch gradient with respect to the field's parameters; "
        f"fresh blocks: {args.batch_size // args.block} blocks of {args.block} rows, each with "
        f"its own {args.references} data points; signal: |E g|^2 of the exact regression.",
        "",
        "| t | " + " | ".join(LOSSES) + " | signal |",
        "|---|" + "---|" * (len(LOSSES) + 1),
    ]
    for row in rows:
        lines.append(f"| {row['t']:.2f} | "
                     + " | ".join(f"{row[k]:.3g}" for k in (*LOSSES, "signal")) + " |")
    lines += [
        "",
        "Per-row squared error of the targets against the exact velocity, E|target - u_t|^2:",
        "",
        "| t | conditional | averaged | fresh blocks |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['t']:.2f} | {row['mse conditional']:.4f} | "
                     f"{row['mse averaged']:.4f} | {row['mse fresh blocks']:.4f} |")
    write_report(args.results / "fm_gradient_noise.md", lines)


if __name__ == "__main__":
    main()
