"""zuko's continuous normalizing flow as a peer in flowlab's time-to-quality benchmark.

The peer is ``zuko.flows.CNF``: FFJORD with an MLP vector field, the exact trace of its
Jacobian, zuko's own Dormand-Prince solver and its adaptive-checkpoint adjoint (ACA). It is
trained by maximum likelihood the way ``flowlab train`` trains flowlab's models:

- the same batches: ``dataset.sample(batch_size, generator=g)`` with
  ``g = torch.Generator().manual_seed(seed + 1)``, and ``torch.manual_seed(seed)`` before the
  weights are initialised;
- the same optimizer (AdamW, no weight decay, i.e. Adam) and the same learning rate, flowlab's
  ``learning_rate`` with a budget in seconds (cosine decay to 1% of ``lr`` by default);
- the same clock: "seconds" counts only training steps (``perf_counter`` around the learning
  rate update, batch draw, forward, backward and optimizer step), never snapshot writing or
  logging.

Direction, as in zuko: the transform maps data to noise (``x`` at t=0 to ``z`` at t=1) and
``log p(x) = log N(z; 0, I) + log|det dz/dx|``; sampling integrates from t=1 back to t=0.

A run folder holds ``config.json``, ``log.jsonl`` (one record every ``log_every`` steps),
``snapshots/tNNNNN.safetensors`` (weights when the training clock first passed each snapshot
time, named by the nominal time in whole seconds) and ``snapshots.json`` (the nominal time,
the actual clock and step, and the file of each snapshot). Nothing is pickled.

NFE: every count here is the number of forward calls of the vector-field MLP
(``flow.transform.ode``), taken by a forward hook that exists only while a count is open.
zuko's Dormand-Prince step evaluates all 7 stages on every trial step, accepted or rejected
(it does not reuse the last stage), so a forward solve costs 7 NFE per trial step. Its adjoint
replays each accepted step backwards from the state saved at its end with one 6-stage
Dormand-Prince step on (state, adjoint, parameter gradients), without error control, so a
backward pass costs 6 NFE per accepted forward step; each of those calls also differentiates
through the MLP and, for the exact trace, through its Jacobian (those are backward passes of
the MLP and are not counted).

Usage (from the repository root)::

    python benchmarks/peers/zuko_cnf.py --data moons --seconds 60 --out runs/zuko-moons
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import zuko
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from flowlab.data import get_dataset
from flowlab.errors import ConfigError, NonFiniteError, RunDirError, SolverError
from flowlab.eval.nll import heldout_points, mean_and_se
from flowlab.train.checkpoint import atomic_write_bytes, atomic_write_json
from flowlab.train.loop import TrainConfig, check_finite, data_stream, learning_rate

CONFIG = "config.json"
LOG = "log.jsonl"
SNAPSHOTS = "snapshots"
SNAPSHOT_INDEX = "snapshots.json"
DEFAULT_SNAPSHOTS = (10, 20, 30, 45, 60, 90, 120, 180, 300, 450, 600)
# zuko's solver has no step limit: with non-finite dynamics it shrinks the step for ever. This
# is flowlab's limit (10,000 steps) at 7 evaluations per step.
MAX_NFE = 70_000


def build_flow(dim: int, hidden: Sequence[int] = (64, 64, 64), **kwargs: Any) -> zuko.flows.CNF:
    """zuko's CNF on ``dim`` features with a vector-field MLP of widths ``hidden``.

    Everything else is zuko's default unless given in ``kwargs`` (passed to
    ``zuko.flows.FFJTransform``): ELU activations, time embedded by ``freqs=3`` frequencies
    (cos and sin of ``k * pi * t``, k = 1..3, concatenated to the state), the exact trace of
    the Jacobian (``exact=True``), Dormand-Prince at ``atol=1e-6``, ``rtol=1e-5``, integrated
    over t in [0, 1], and a standard normal base. zuko's own default width is (64, 64); (64, 64,
    64) matches flowlab's FFJORD.
    """
    return zuko.flows.CNF(dim, hidden_features=tuple(int(h) for h in hidden), **kwargs)


def vector_field_net(flow: zuko.flows.CNF) -> torch.nn.Module:
    """The MLP whose forward calls are the flow's function evaluations."""
    return flow.transform.ode


@dataclass
class CallCount:
    """Forward calls of one module counted while a :func:`counting_calls` block is open."""

    calls: int = 0


@contextmanager
def counting_calls(module: torch.nn.Module, limit: int = MAX_NFE) -> Iterator[CallCount]:
    """Count the forward calls of ``module`` inside the block; the hook is removed on exit.

    Raises SolverError past ``limit`` calls: zuko's solver has no step limit of its own and
    would otherwise loop for ever on dynamics it cannot integrate.
    """
    count = CallCount()

    def hook(_module: torch.nn.Module, _args: Any, _output: Any) -> None:
        count.calls += 1
        if count.calls > limit:
            raise SolverError(
                f"zuko's solver made more than {limit} function evaluations; the dynamics are "
                "too stiff or not finite. Lower the learning rate or loosen atol/rtol."
            )

    handle = module.register_forward_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


def _snapshot_times(snapshot_at: Sequence[float], seconds: float) -> list[float]:
    """Snapshot times inside the budget, plus the budget itself (the final weights)."""
    if any(not (t > 0) for t in snapshot_at):
        raise ConfigError(f"snapshot times must be positive seconds, got {list(snapshot_at)}")
    times = sorted({float(t) for t in snapshot_at if t < seconds} | {float(seconds)})
    names = [snapshot_name(t) for t in times]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"snapshot times {times} (with the budget {seconds} s) give the same file name "
            f"twice ({names}); snapshots are named by whole seconds"
        )
    return times


def snapshot_name(at: float) -> str:
    """File name of the snapshot taken when the clock first passed ``at`` seconds."""
    return f"t{int(at):05d}.safetensors"


def _save_snapshot(path: Path, flow: torch.nn.Module, step: int, seconds: float) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in flow.state_dict().items()}
    meta = {"peer": "zuko", "step": str(step), "seconds": f"{seconds:.6f}"}
    atomic_write_bytes(path, st_save(tensors, metadata=meta))


def train(
    dataset_name: str,
    seconds: float,
    out_dir: str | Path,
    snapshot_at: Sequence[float] = DEFAULT_SNAPSHOTS,
    seed: int = 0,
    batch_size: int = 512,
    lr: float = 1e-3,
    schedule: str = "cosine",
    hidden: Sequence[int] = (64, 64, 64),
    log_every: int = 10,
    progress: bool = False,
) -> dict[str, Any]:
    """Train zuko's CNF on ``dataset_name`` for ``seconds`` of training time into ``out_dir``.

    The loss is the batch mean of ``-flow().log_prob(x)`` (nats). Snapshots are taken at the
    times in ``snapshot_at`` that fall inside the budget and at the budget itself. Log records
    are ``{"step", "seconds", "loss", "nll", "lr", "nfe_forward", "nfe_backward"}``, where the
    NFE are the vector-field calls of that step's forward solve and adjoint pass (see the
    module docstring), plus a last record for the final step.

    Returns ``{"steps", "seconds", "loss", "snapshots", "out_dir", "flow"}`` with the trained
    flow (the weights of the last snapshot). Raises NonFiniteError (naming the step) on a
    non-finite loss or gradient, RunDirError if ``out_dir`` is not empty.
    """
    config = TrainConfig(seconds=seconds, batch_size=batch_size, lr=lr, schedule=schedule,
                         log_every=log_every, seed=seed)
    times = _snapshot_times(snapshot_at, seconds)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise RunDirError(f"run folder {out_dir} is not empty; choose another or empty it")
    (out_dir / SNAPSHOTS).mkdir(parents=True, exist_ok=True)
    dataset = get_dataset(dataset_name)

    torch.manual_seed(seed)
    flow = build_flow(dataset.dim, hidden)
    ode = flow.transform
    atomic_write_json(out_dir / CONFIG, {
        "peer": "zuko", "zuko_version": zuko.__version__, "torch_version": torch.__version__,
        "dataset": dataset.name, "seconds": float(seconds), "batch_size": batch_size,
        "lr": lr, "schedule": schedule, "lr_min_ratio": config.lr_min_ratio,
        "optimizer": "AdamW(weight_decay=0)", "hidden": [int(h) for h in hidden],
        "seed": seed, "snapshot_at": times, "log_every": log_every,
        "flow": {"features": dataset.dim, "hidden": [int(h) for h in hidden],
                 "freqs": len(ode.freqs), "atol": ode.atol, "rtol": ode.rtol,
                 "exact": ode.exact, "activation": type(ode.ode[1]).__name__},
    })

    ref = next(flow.parameters())
    net = vector_field_net(flow)
    batches = data_stream(dataset, batch_size, seed)
    optimizer = torch.optim.AdamW(flow.parameters(), lr=lr, weight_decay=0.0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=float(seconds), unit="s", dynamic_ncols=True,
                   desc=f"train zuko CNF on {dataset.name}",
                   bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s{postfix}")
    pending = list(times)
    snapshots: list[dict[str, Any]] = []
    step, clock, record = 0, 0.0, {}
    flow.train()
    try:
        with open(out_dir / LOG, "w") as log_file:
            while clock < seconds:
                start = time.perf_counter()
                rate = learning_rate(config, step, clock / seconds)
                for group in optimizer.param_groups:
                    group["lr"] = rate
                batch = next(batches).to(ref)
                optimizer.zero_grad(set_to_none=True)
                with counting_calls(net) as count:
                    loss = -flow().log_prob(batch).mean()
                    nfe_forward = count.calls
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise NonFiniteError(
                            f"step {step}: the training loss is {value} nats; lower the "
                            "learning rate"
                        )
                    loss.backward()
                nfe_backward = count.calls - nfe_forward
                check_finite(step, loss.detach(), flow)
                optimizer.step()
                step += 1
                elapsed = time.perf_counter() - start
                clock += elapsed

                record = {"step": step, "seconds": round(clock, 3), "loss": value, "nll": value,
                          "lr": rate, "nfe_forward": nfe_forward, "nfe_backward": nfe_backward}
                if step % log_every == 0 or clock >= seconds:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                while pending and clock >= pending[0]:
                    at = pending.pop(0)
                    name = snapshot_name(at)
                    _save_snapshot(out_dir / SNAPSHOTS / name, flow, step, clock)
                    snapshots.append({"at": at, "seconds": clock, "step": step, "file": name})
                    atomic_write_json(out_dir / SNAPSHOT_INDEX, snapshots)
                if bar is not None:
                    bar.update(min(elapsed, bar.total - bar.n))  # the last step overshoots
                    bar.set_postfix({"nll": f"{value:.3f}", "nfe": nfe_forward}, refresh=False)
    finally:
        if bar is not None:
            bar.close()
    return {"steps": step, "seconds": clock, "loss": record.get("loss", float("nan")),
            "snapshots": snapshots, "out_dir": str(out_dir), "flow": flow}


def load_flow(out_dir: str | Path, snapshot_file: str | Path | None = None) -> zuko.flows.CNF:
    """The flow of a run folder with the weights of one snapshot (default: the last one).

    ``snapshot_file`` is a path or a name inside ``out_dir/snapshots``. The flow is rebuilt
    from ``config.json``; the returned flow is in eval mode.
    """
    out_dir = Path(out_dir)
    try:
        config = json.loads((out_dir / CONFIG).read_text())
        if snapshot_file is None:
            snapshot_file = json.loads((out_dir / SNAPSHOT_INDEX).read_text())[-1]["file"]
    except (OSError, json.JSONDecodeError, IndexError, KeyError) as err:
        raise RunDirError(f"{out_dir}: not a finished zuko peer run folder ({err})") from err
    path = Path(snapshot_file)
    if not path.is_file():
        path = out_dir / SNAPSHOTS / path.name
    if not path.is_file():
        raise RunDirError(f"{out_dir}: no snapshot {snapshot_file}")
    options = dict(config["flow"])
    flow = build_flow(options.pop("features"), options.pop("hidden"), freqs=options["freqs"],
                      atol=options["atol"], rtol=options["rtol"], exact=options["exact"])
    flow.load_state_dict(load_file(path))
    return flow.eval()


def _with_dtype(flow: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``flow`` itself if its weights are already ``dtype``, else a converted copy."""
    if next(flow.parameters()).dtype == dtype:
        return flow
    return copy.deepcopy(flow).to(dtype)


def log_density(
    flow: zuko.flows.CNF,
    points: torch.Tensor,
    *,
    batch_size: int = 10_000,
    atol: float = 1e-6,
    rtol: float = 1e-6,
    dtype: torch.dtype = torch.float64,
    trace_scale: float = 1.0,
) -> tuple[torch.Tensor, list[int]]:
    """Exact log-density in nats of each point, ``(n, D) -> (n,)`` float64 on the CPU, and the
    NFE of each batch solve.

    In eval mode and without gradients, in ``dtype`` (the flow is copied if its weights are
    another dtype). The tolerances are set on the transform built for each batch, not on the
    module. zuko integrates the log-determinant scaled by ``trace_scale=1e-2``, which loosens
    its absolute tolerance 100 times; the default here, 1.0, holds it to ``atol`` like the
    state, as flowlab's solver does.
    """
    model = _with_dtype(flow, dtype)
    ref = next(model.parameters())
    net = vector_field_net(model)
    was_training = model.training
    model.eval()
    values, nfes = [], []
    try:
        with torch.no_grad():
            for chunk in points.split(batch_size):
                dist = model()
                transform = dist.transform
                transform.atol, transform.rtol, transform.trace_scale = atol, rtol, trace_scale
                with counting_calls(net) as count:
                    values.append(dist.log_prob(chunk.to(ref)).double().cpu())
                nfes.append(count.calls)
    finally:
        model.train(was_training)
    return torch.cat(values), nfes


def evaluate(
    flow: zuko.flows.CNF,
    points: torch.Tensor,
    batch_size: int = 10_000,
    atol: float = 1e-6,
    rtol: float = 1e-6,
    dtype: torch.dtype = torch.float64,
    reference: Any = None,
) -> dict[str, float]:
    """Test NLL in nats of ``points`` under ``flow``, with its standard error over the points.

    flowlab evaluates its CNFs with the exact divergence and dopri5 at atol=rtol=1e-6 in
    float64; the peer is evaluated the same way (see :func:`log_density`). ``nfe`` is the mean
    number of vector-field calls per batch solve and ``seconds`` the wall time of the pass.
    With ``reference`` (the true density, e.g. the dataset) the paired estimate of
    KL(data || model) and its standard error are added as ``kl_nats`` and ``kl_se``.
    """
    start = time.perf_counter()
    logp, nfes = log_density(flow, points, batch_size=batch_size, atol=atol, rtol=rtol,
                             dtype=dtype)
    seconds = time.perf_counter() - start
    if torch.isnan(logp).any():
        raise NonFiniteError(f"{int(torch.isnan(logp).sum())} of {logp.numel()} test "
                             "log-densities are NaN")
    nll, se = mean_and_se(-logp)
    result = {"nll_nats": nll, "nll_se": se, "n_test": int(logp.numel()),
              "nfe": sum(nfes) / len(nfes), "seconds": seconds}
    if reference is not None:
        true_logp = reference.log_prob(points.double()).double().cpu()
        result["kl_nats"], result["kl_se"] = mean_and_se(true_logp - logp)
    return result


def sample(flow: zuko.flows.CNF, n: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    """``n`` samples ``(n, D)`` in the flow's dtype and device, and the NFE of the solve.

    The base noise is drawn from a CPU generator seeded with ``seed`` (the global RNG is not
    touched) and integrated from t=1 to t=0 by zuko's adaptive solver at the flow's own
    tolerances (zuko's defaults: atol=1e-6, rtol=1e-5), in eval mode without gradients.
    """
    ref = next(flow.parameters())
    net = vector_field_net(flow)
    generator = torch.Generator().manual_seed(seed)
    was_training = flow.training
    flow.eval()
    try:
        with torch.no_grad():
            dist = flow()
            eps = torch.randn((n, *dist.event_shape), generator=generator, dtype=ref.dtype)
            z = dist.base.mean + dist.base.stddev * eps.to(ref.device)
            with counting_calls(net) as count:
                x = dist.transform.inv(z)
    finally:
        flow.train(was_training)
    return x, count.calls


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="flowlab toy dataset, e.g. moons")
    parser.add_argument("--seconds", type=float, default=60.0, help="training budget (s)")
    parser.add_argument("--out", type=Path, help="run folder (default runs/zuko-DATA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="cosine")
    parser.add_argument("--hidden", default="64,64,64", help="vector-field widths")
    parser.add_argument("--snapshots", default=",".join(map(str, DEFAULT_SNAPSHOTS)),
                        help="training times (s) at which to save the weights")
    parser.add_argument("--n-test", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--force", action="store_true", help="replace an existing run folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / f"zuko-{args.data}"
    if args.force and out.exists():
        shutil.rmtree(out)

    dataset = get_dataset(args.data)
    result = train(
        args.data, args.seconds, out, snapshot_at=_floats(args.snapshots), seed=args.seed,
        batch_size=args.batch_size, lr=args.lr, schedule=args.schedule,
        hidden=[int(h) for h in _floats(args.hidden)], progress=args.progress,
    )
    steps, seconds = result["steps"], result["seconds"]
    last = result["snapshots"][-1]
    print(f"trained {steps} steps in {seconds:.1f} s of training ({steps / seconds:.2f} steps/s); "
          f"last batch NLL {result['loss']:.4f} nats")
    flow = load_flow(out, last["file"])
    report = evaluate(flow, heldout_points(dataset, args.n_test), reference=dataset)
    gap = report["nll_nats"] - dataset.entropy
    report = {"peer": "zuko", "dataset": dataset.name, **report, "entropy_nats": dataset.entropy,
              "gap_nats": gap, "snapshot": last["file"], "train_steps": steps,
              "train_seconds": seconds, "solver": "dopri5 (atol=1e-06, rtol=1e-06), float64"}
    atomic_write_json(out / "eval.json", report)
    print(f"test NLL        {report['nll_nats']:.4f} ± {report['nll_se']:.4f} nats (± 1 s.e., "
          f"{report['n_test']} points)")
    print(f"true entropy H  {dataset.entropy:.4f} nats")
    print(f"gap NLL - H     {gap:+.4f} nats")
    print(f"KL(data||model) {report['kl_nats']:+.4f} ± {report['kl_se']:.4f} nats (paired)")
    print(f"NFE per solve   {report['nfe']:.0f}; {report['seconds']:.1f} s")
    print(f"wrote {out / 'eval.json'}")


if __name__ == "__main__":
    main()
