"""How far the flow-matching targets, and trained fields, are from the exact marginal velocity.

On 8gaussians (a Gaussian mixture) the marginal velocity of flowlab's linear path is known in
closed form: with ``x_t = a x + sigma z`` (``a = 1 - t``, ``sigma = sigma_min + (1 - sigma_min)
t``) the posterior of the data point given ``x_t`` is again a mixture, and

    u_t(y) = E[(1 - sigma_min) z - x | x_t = y] = (1 - sigma_min) (y - a m(y)) / sigma - m(y),

with ``m(y) = E[x | x_t = y]``. This script measures, at a grid of times, the mean squared
error against it (over ``y ~ p_t``) of

- the conditional target ``(1 - sigma_min) z - x`` (what ``--target conditional`` regresses on),
- the averaged target over a batch (``--target averaged``, :mod:`flowlab.fm.targets`),
- the field of each trained run given with ``--runs`` (``flowlab train --model cfm`` folders).

A field trained on a noisy target ends with an error set by that noise and by how well the
training averages it out; its error at each time shows where the likelihood is lost. For each
field the error of its Jacobian ``dv/dy`` is given too (mean squared Frobenius norm against
the exact velocity's Jacobian): the log-density integrates the field's divergence, so a small
error that varies quickly, barely visible in the mean squared error, can still cost likelihood.
The density itself is used here only to score; no model is trained on it.

With ``--bias-repeats R`` it also splits the averaged target's error into bias and noise: for
``--bias-points`` path points ``y`` (drawn with their data points from the path), the data
point behind ``y`` is redrawn from its exact posterior and the other batch points from the data
``R`` times; the mean of the ``R`` estimates minus the exact velocity is the bias (up to a
Monte-Carlo floor of variance / ``R``, reported beside it).

Usage: ``python benchmarks/fm_target_noise.py [--runs RUN ...] [--batch-size 512]
[--batches 8] [--bias-repeats 10000]``; writes ``benchmarks/results/fm_target_noise.md``.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from flowlab.data import get_dataset
from flowlab.fm.paths import LinearPath
from flowlab.fm.targets import averaged_velocity, path_gaussian
from flowlab.train.checkpoint import load_model

ROOT = Path(__file__).resolve().parent
TIMES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)


def path_scales(path: LinearPath, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, sigma)`` of ``x_t | x ~ N(a x, sigma^2 I)`` at time ``t``, as 0-d float64 tensors."""
    a, sigma, _ = path_gaussian(path, torch.tensor(t, dtype=torch.float64))
    return a, sigma


def posterior(centres: torch.Tensor, std: float, path: LinearPath, y: torch.Tensor, t: float):
    """The posterior of the data point behind ``x_t = y`` for an equal-weight mixture of
    ``N(centre, std^2 I)``: component probabilities ``(n, k)``, component means ``(n, k, d)``
    and the common standard deviation."""
    a, sigma = path_scales(path, t)
    var = (a * std) ** 2 + sigma**2  # x_t | component k ~ N(a centre_k, var I)
    offset = y[:, None, :] - a * centres[None]  # (n, k, d)
    resp = torch.softmax(-offset.pow(2).sum(2) / (2 * var), dim=1)
    return resp, centres[None] + (a * std**2 / var) * offset, std * sigma / var**0.5


def velocity_given_mean(path: LinearPath, y: torch.Tensor, t: float, mean: torch.Tensor):
    """``E[(1 - sigma_min) z - x | x_t = y]`` from ``mean = E[x | x_t = y]``."""
    a, sigma = path_scales(path, t)
    return (1.0 - path.sigma_min) * (y - a * mean) / sigma - mean


def posterior_average(path: LinearPath, y: torch.Tensor, t: float,
                      points: torch.Tensor) -> torch.Tensor:
    """The averaged target at ``y``: the velocity of the posterior mean over each row's own
    candidate data points ``points`` ``(n, k, d)``, weighted by ``N(y; a x_j, sigma^2 I)``."""
    a, sigma = path_scales(path, t)
    weights = torch.softmax(-(y[:, None] - a * points).pow(2).sum(2) / (2 * sigma**2), dim=1)
    return velocity_given_mean(path, y, t, (weights[..., None] * points).sum(1))


def exact_velocity(centres: torch.Tensor, std: float, path: LinearPath, y: torch.Tensor,
                   t: float) -> torch.Tensor:
    """The marginal velocity at ``y`` of the linear path from an equal-weight mixture of
    ``N(centre, std^2 I)`` (float64)."""
    resp, means, _ = posterior(centres, std, path, y, t)
    return velocity_given_mean(path, y, t, (resp[..., None] * means).sum(1))


def target_errors(data, path: LinearPath, batch_size: int, batches: int, fields: dict,
                  seed: int = 0) -> list[dict]:
    """Per time: mean squared error against the exact velocity of the conditional and the
    averaged target, and of each field in ``fields`` (name -> callable ``(t, y)``), with the
    field's Jacobian error under ``"<name> jacobian"``."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for t in TIMES:
        sums = {"conditional": 0.0, "averaged": 0.0, **{name: 0.0 for name in fields},
                **{f"{name} jacobian": 0.0 for name in fields}}
        for _ in range(batches):
            x = data.sample(batch_size, generator=generator).to(torch.float64)
            z = torch.randn(x.shape, generator=generator, dtype=torch.float64)
            times = torch.full((batch_size,), t, dtype=torch.float64)
            y, conditional = path.point_and_velocity(x, z, times)
            exact = exact_velocity(data.centres, data.std, path, y, t)
            averaged = averaged_velocity(path, x, z, times, conditional)
            sums["conditional"] += (conditional - exact).pow(2).sum(1).mean().item()
            sums["averaged"] += (averaged - exact).pow(2).sum(1).mean().item()
            if fields:
                exact_jacobian = jacobian(lambda q, t=t: exact_velocity(
                    data.centres, data.std, path, q, t), y)
            for name, field in fields.items():
                with torch.no_grad():
                    sums[name] += (field(times, y) - exact).pow(2).sum(1).mean().item()
                error = jacobian(lambda q, f=field, s=times: f(s, q), y) - exact_jacobian
                sums[f"{name} jacobian"] += error.pow(2).sum((1, 2)).mean().item()
        rows.append({"t": t, **{k: v / batches for k, v in sums.items()}})
    return rows


def jacobian(function, y: torch.Tensor) -> torch.Tensor:
    """Per-row Jacobians ``(n, d, d)`` of a row-wise map ``(n, d) -> (n, d)``, entry ``[i, j]``
    the derivative of output ``i`` with respect to input ``j``."""
    y = y.detach().requires_grad_(True)
    with torch.enable_grad():
        v = function(y)
        rows = [torch.autograd.grad(v[:, i].sum(), y, retain_graph=True)[0]
                for i in range(v.shape[1])]
    return torch.stack(rows, 1).detach()


def target_bias(data, path: LinearPath, batch_size: int, points: int, repeats: int,
                seed: int = 0) -> list[dict]:
    """Per time: squared bias, its Monte-Carlo floor and the variance of the averaged target
    with the given batch size (the batch holds the data point behind each path point).

    The estimate is that of :func:`flowlab.fm.targets.averaged_velocity` (checked against
    brute force in ``tests/fm/test_targets.py``), written here for one path point and many
    batches at a time: the Gaussian-weighted mean of the batch's data points, turned into a
    velocity.
    """
    generator = torch.Generator().manual_seed(seed)
    centres, std = data.centres, data.std
    rows = []
    for t in TIMES:
        a, sigma = path_scales(path, t)
        x = data.sample(points, generator=generator).to(torch.float64)
        y = a * x + sigma * torch.randn(x.shape, generator=generator, dtype=torch.float64)
        exact = exact_velocity(centres, std, path, y, t)
        resp, means, sd = posterior(centres, std, path, y, t)
        total = torch.zeros_like(y)
        square = torch.zeros_like(y)
        rows_index = torch.arange(points)
        for _ in range(repeats):
            k = torch.multinomial(resp, 1, generator=generator).squeeze(1)
            own = means[rows_index, k] + sd * torch.randn(y.shape, generator=generator,
                                                          dtype=torch.float64)
            others = data.sample(points * (batch_size - 1), generator=generator)
            batch = torch.cat([own[:, None], others.to(torch.float64).reshape(
                points, batch_size - 1, -1)], dim=1)  # (points, batch, d)
            estimate = posterior_average(path, y, t, batch)
            total += estimate
            square += estimate**2
        average = total / repeats
        variance = (square / repeats - average**2).sum(1).mean().item()
        rows.append({"t": t, "bias2": (average - exact).pow(2).sum(1).mean().item(),
                     "floor": variance / repeats, "variance": variance})
    return rows


def report_head(script: str, argv: list[str] | None) -> list[str]:
    """The command and machine lines that open a report of ``benchmarks/<script>``."""
    arguments = " ".join(sys.argv[1:] if argv is None else argv)
    return [f"Command: `python benchmarks/{script} {arguments}`  ",
            f"Machine: {platform.machine()}, Python {platform.python_version()}, torch "
            f"{torch.__version__}."]


def write_report(file: Path, lines: list[str]) -> None:
    """Write the report's lines to ``file`` (creating its folder) and print them."""
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="*", default=[],
                        help="flowlab cfm run folders trained on 8gaussians")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--bias-repeats", type=int, default=0,
                        help="batches drawn per path point to measure the averaged target's "
                             "bias (0: skip)")
    parser.add_argument("--bias-points", type=int, default=100)
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = get_dataset("8gaussians")
    path = LinearPath()
    fields = {}
    for run in args.runs:
        model = load_model(run / "model.safetensors").double().eval()
        if getattr(model, "path", None) != path:
            parser.error(f"{run}: not a flow-matching model on the linear path with sigma_min "
                         f"{path.sigma_min} (the exact velocity here is that path's)")
        fields[run.name if run.name not in fields else str(run)] = model.blocks[0].field
    rows = target_errors(data, path, args.batch_size, args.batches, fields)
    names = ["conditional", f"averaged (batch {args.batch_size})", *fields]
    keys = ["conditional", "averaged", *fields]
    lines = [
        "# Flow-matching targets and fields against the exact marginal velocity",
        "",
        *report_head("fm_target_noise.py", argv),
        "",
        f"Mean squared error E|target - u_t(x_t)|^2 on 8gaussians, linear path (sigma_min "
        f"{path.sigma_min:g}), over {args.batches} batches of {args.batch_size} points per time:",
        "",
        "| t | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for row in rows:
        lines.append(f"| {row['t']:.2f} | " + " | ".join(f"{row[k]:.5f}" for k in keys) + " |")
    if fields:
        lines += [
            "",
            "Jacobian error of each field, E||dv/dy - du_t/dy||_F^2 over the same points:",
            "",
            "| t | " + " | ".join(fields) + " |",
            "|---|" + "---|" * len(fields),
        ]
        for row in rows:
            lines.append(f"| {row['t']:.2f} | "
                         + " | ".join(f"{row[f'{k} jacobian']:.4f}" for k in fields) + " |")
    if args.bias_repeats > 0:
        lines += [
            "",
            f"Bias of the averaged target (batch {args.batch_size}): {args.bias_points} path "
            f"points per time, {args.bias_repeats} batches each (the data point behind each "
            "drawn from its exact posterior); squared bias |E[target | x_t] - u_t(x_t)|^2 "
            "beside its Monte-Carlo floor (variance / batches) and the variance:",
            "",
            "| t | squared bias | floor | variance |",
            "|---|---|---|---|",
        ]
        for row in target_bias(data, path, args.batch_size, args.bias_points,
                               args.bias_repeats):
            lines.append(f"| {row['t']:.2f} | {row['bias2']:.6f} | {row['floor']:.6f} | "
                         f"{row['variance']:.5f} |")
    write_report(args.results / "fm_target_noise.md", lines)


if __name__ == "__main__":
    main()
