"""zuko's and nflows' discrete flows as peers in flowlab's discrete-flow benchmark.

Four peers, each sized like flowlab's default for the family of the same name (``flowlab
train --model maf`` or ``nsf-ar``: the parameter counts are printed and stored with the run):

============== ====================================================================================
``zuko-maf``   ``zuko.flows.MAF(2, transforms=5, hidden_features=(64, 64))``: 5 masked affine
               autoregressive steps, MADE 64 x 64 ReLU, order reversed every other step; the
               log-scale is soft-clamped by zuko (``slope=1e-3``). flowlab ``maf``: 5 steps,
               MADE 64 x 64 ReLU, order reversed every other step, scale
               softplus(r + r0) + e^-7, 1 at r = 0.
``zuko-nsf``   ``zuko.flows.NSF(2, transforms=4, bins=8, hidden_features=(64, 64))``: 4
               autoregressive rational-quadratic spline steps, 8 bins on zuko's own domain
               [-5, 5] (identity outside). flowlab ``nsf-ar``: 4 steps, 8 bins on [-4, 4].
``nflows-maf`` ``nflows.flows.MaskedAutoregressiveFlow(2, hidden_features=64, num_layers=5,
               num_blocks_per_layer=1, use_residual_blocks=False)``: a reverse permutation
               before each of 5 masked affine steps (softplus scale), MADE 2 -> 64 -> 64 -> out
               ReLU (nflows' default would be residual blocks; these match flowlab's depth).
``nflows-nsf`` nflows has no ready-made spline flow class; the NSF paper's autoregressive flow
               built from nflows' pieces: 4 x (``ReversePermutation``,
               ``MaskedPiecewiseRationalQuadraticAutoregressiveTransform(2, 64, num_bins=8,
               tails="linear", tail_bound=4.0, num_blocks=1, use_residual_blocks=False)``)
               on ``StandardNormal([2])``: the same bins, bound and MADE as flowlab ``nsf-ar``.
============== ====================================================================================

Training follows ``flowlab train`` (``flowlab.train.loop``) step for step:

- the same batches: ``dataset.sample(batch_size, generator=g)`` with
  ``g = torch.Generator().manual_seed(seed + 1)``; ``torch.manual_seed(seed)`` before the
  weights are built;
- the same optimizer and schedule: AdamW (weight decay 0), flowlab's ``learning_rate``
  (cosine from 5e-3 to 1% of it over the budget by default), batch 512;
- the same clock: "seconds" counts only training steps (learning-rate update, batch draw,
  forward, backward, finiteness check, optimizer step), never logging or saving;
- the same check: flowlab's ``check_finite`` after each backward pass; a NaN or Inf loss or
  gradient stops the run with an error naming the step (flowlab's loop would restore its last
  checkpoint and halve the learning rate; the peers do not retry).

Direction, as in flowlab, zuko and nflows: the transform maps data to noise and
``log p(x) = log N(z; 0, I) + log|det dz/dx|``; sampling runs it backwards.

A run folder holds ``config.json``, ``log.jsonl`` (step, seconds, loss, lr every ``log_every``
steps and at the last step), ``model.safetensors`` (the final weights, nothing pickled) and,
after evaluation, ``eval.json``. Evaluation is flowlab's :func:`~flowlab.eval.evaluate_nll` on
:func:`~flowlab.eval.heldout_points` (20,000 points, the fixed test seed) with the model in
float64: exact log-densities, as for flowlab's discrete flows.

Usage (from the repository root, after ``pip install -e ".[bench]"``)::

    python benchmarks/peers/flow_peers.py --flow zuko-nsf --data moons --seconds 60 \
        --out runs/zuko-nsf-moons
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from flowlab.data import get_dataset
from flowlab.errors import ConfigError, FlowlabError, RunDirError
from flowlab.eval.nll import evaluate_nll, heldout_points
from flowlab.train.checkpoint import atomic_write_bytes, atomic_write_json
from flowlab.train.loop import (
    TrainConfig,
    budget_progress,
    check_finite,
    data_stream,
    learning_rate,
)

CONFIG = "config.json"
LOG = "log.jsonl"
WEIGHTS = "model.safetensors"
EVAL = "eval.json"
PEERS = ("zuko-maf", "zuko-nsf", "nflows-maf", "nflows-nsf")
MAF_BLOCKS, NSF_BLOCKS, HIDDEN, BINS, NFLOWS_BOUND = 5, 4, 64, 8, 4.0


# -- the flows -------------------------------------------------------------------------------------
def _zuko_maf(dim: int) -> torch.nn.Module:
    import zuko

    return zuko.flows.MAF(dim, transforms=MAF_BLOCKS, hidden_features=(HIDDEN, HIDDEN))


def _zuko_nsf(dim: int) -> torch.nn.Module:
    import zuko

    return zuko.flows.NSF(dim, transforms=NSF_BLOCKS, bins=BINS, hidden_features=(HIDDEN, HIDDEN))


def _nflows_maf(dim: int) -> torch.nn.Module:
    from nflows.flows import MaskedAutoregressiveFlow

    return MaskedAutoregressiveFlow(features=dim, hidden_features=HIDDEN, num_layers=MAF_BLOCKS,
                                    num_blocks_per_layer=1, use_residual_blocks=False)


def _nflows_nsf(dim: int) -> torch.nn.Module:
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.transforms import (
        CompositeTransform,
        MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
        ReversePermutation,
    )

    layers = []
    for _ in range(NSF_BLOCKS):
        layers += [
            ReversePermutation(dim),
            MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                features=dim, hidden_features=HIDDEN, num_bins=BINS, tails="linear",
                tail_bound=NFLOWS_BOUND, num_blocks=1, use_residual_blocks=False,
            ),
        ]
    return Flow(CompositeTransform(layers), StandardNormal([dim]))


BUILDERS: dict[str, Callable[[int], torch.nn.Module]] = {
    "zuko-maf": _zuko_maf, "zuko-nsf": _zuko_nsf,
    "nflows-maf": _nflows_maf, "nflows-nsf": _nflows_nsf,
}


class PeerFlow(torch.nn.Module):
    """One library's flow behind the two calls the benchmark needs.

    ``log_prob``: data ``(batch, D) -> (batch,)`` log-density in nats (data -> noise pass);
    ``sample``: points ``(*sample_shape, D)`` (noise -> data pass), in the weights' dtype. zuko's
    flows are called to build their distribution (``flow().log_prob``), nflows' flows are the
    distribution (``flow.log_prob``); that is the only difference between the libraries here.
    """

    def __init__(self, name: str, dim: int):
        super().__init__()
        if name not in BUILDERS:
            raise ConfigError(f"unknown peer {name!r}; choose one of {', '.join(PEERS)}")
        self.name = name
        self.library = name.split("-")[0]
        self.dim = int(dim)
        self.flow = BUILDERS[name](self.dim)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        if self.library == "zuko":
            return self.flow().log_prob(x)
        return self.flow.log_prob(x)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        """Samples ``(*sample_shape, D)`` without gradients, as flowlab's ``model.sample``.

        nflows draws its noise in torch's default dtype, so its flows sample in float32 only
        (as the benchmark does); zuko's follow the weights' dtype.
        """
        shape = torch.Size(sample_shape)
        with torch.no_grad():
            if self.library == "zuko":
                return self.flow().sample(shape)
            return self.flow.sample(math.prod(shape)).reshape(*shape, self.dim)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def build_peer(name: str, dim: int = 2) -> PeerFlow:
    """The peer ``name`` (one of :data:`PEERS`) on ``dim`` features, freshly initialised."""
    return PeerFlow(name, dim)


def library_version(name: str) -> str:
    from importlib.metadata import version

    return version(name.split("-")[0])


# -- training -------------------------------------------------------------------------------------
def train(
    name: str,
    dataset_name: str,
    out_dir: str | Path,
    *,
    seconds: float | None = None,
    iters: int | None = None,
    seed: int = 0,
    batch_size: int = 512,
    lr: float = 5e-3,
    schedule: str = "cosine",
    log_every: int = 10,
    callback: Callable[[dict[str, Any], torch.Tensor], None] | None = None,
) -> dict[str, Any]:
    """Train peer ``name`` on ``dataset_name`` for ``seconds`` of training time and/or
    ``iters`` steps into the empty folder ``out_dir``.

    The loss is the batch mean of ``-log_prob`` (nats). ``callback(record, batch)`` is called
    after every step with the log record and the batch it trained on. Returns ``{"steps",
    "seconds", "loss", "out_dir", "model"}``. Raises NonFiniteError (naming the step) on a
    non-finite loss or gradient, RunDirError if ``out_dir`` is not empty.
    """
    config = TrainConfig(iters=iters, seconds=seconds, batch_size=batch_size, lr=lr,
                         schedule=schedule, log_every=log_every, seed=seed)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise RunDirError(f"run folder {out_dir} is not empty; choose another or empty it")
    dataset = get_dataset(dataset_name)
    torch.manual_seed(seed)
    model = build_peer(name, dataset.dim)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / CONFIG, {
        "peer": name, "library_version": library_version(name),
        "torch_version": torch.__version__, "dataset": dataset.name, "dim": dataset.dim,
        "parameters": model.num_parameters(), "optimizer": "AdamW(weight_decay=0)",
        "train": config.to_dict(), "architecture": repr(model.flow),
    })
    ref = next(model.parameters())
    batches = data_stream(dataset, batch_size, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    step, clock, record = 0, 0.0, {}
    model.train()
    with open(out_dir / LOG, "w") as log_file:
        while budget_progress(config, step, clock) < 1.0:
            start = time.perf_counter()
            rate = learning_rate(config, step, budget_progress(config, step, clock))
            for group in optimizer.param_groups:
                group["lr"] = rate
            batch = next(batches).to(ref)
            optimizer.zero_grad(set_to_none=True)
            loss = -model.log_prob(batch).mean()
            loss.backward()
            check_finite(step, loss.detach(), model)
            optimizer.step()
            step += 1
            clock += time.perf_counter() - start
            value = float(loss.detach())
            record = {"step": step, "seconds": round(clock, 3), "loss": value, "nll": value,
                      "lr": rate}
            if step % log_every == 0 or budget_progress(config, step, clock) >= 1.0:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if callback is not None:
                callback(record, batch)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"peer": name, "step": str(step), "seconds": f"{clock:.6f}"}
    atomic_write_bytes(out_dir / WEIGHTS, st_save(tensors, metadata=meta))
    return {"steps": step, "seconds": clock, "loss": record.get("loss", math.nan),
            "out_dir": str(out_dir), "model": model}


def load_peer(out_dir: str | Path) -> PeerFlow:
    """The trained peer of a run folder (final weights, float32, eval mode)."""
    out_dir = Path(out_dir)
    try:
        config = json.loads((out_dir / CONFIG).read_text())
        model = build_peer(config["peer"], config["dim"])
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise RunDirError(f"{out_dir}: not a finished peer run folder ({err})") from err
    if not (out_dir / WEIGHTS).is_file():
        raise RunDirError(f"{out_dir / WEIGHTS} is missing: the run did not finish")
    model.load_state_dict(load_file(out_dir / WEIGHTS))
    return model.eval()


def final_step(out_dir: str | Path) -> tuple[int, float]:
    """``(steps, seconds of training)`` of a finished run, from its last log record."""
    lines = (Path(out_dir) / LOG).read_text().splitlines()
    last = json.loads(lines[-1]) if lines else {"step": 0, "seconds": 0.0}
    return int(last["step"]), float(last["seconds"])


def evaluate(model: PeerFlow, dataset_name: str, n_test: int = 20_000,
             batch_size: int = 10_000) -> dict[str, Any]:
    """flowlab's evaluation of a peer: NLL in nats +- s.e., gap to H and paired KL on the
    fixed held-out points, the model converted to float64 (a copy; ``model`` is untouched)."""
    import copy

    dataset = get_dataset(dataset_name)
    points = heldout_points(dataset, n_test)
    result = evaluate_nll(copy.deepcopy(model).double(), points, batch_size=batch_size,
                          entropy=dataset.entropy, reference=dataset)
    return {"dataset": dataset.name, "model": model.name, **result.to_dict(),
            "dtype": "float64"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flow", required=True, choices=PEERS)
    parser.add_argument("--data", required=True, help="flowlab toy dataset, e.g. moons")
    parser.add_argument("--seconds", type=float, default=None, help="training budget (s)")
    parser.add_argument("--iters", type=int, default=None, help="training budget (steps)")
    parser.add_argument("--out", type=Path, help="run folder (default runs/FLOW-DATA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="cosine")
    parser.add_argument("--n-test", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="replace an existing run folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / f"{args.flow}-{args.data}"
    if args.seconds is None and args.iters is None:
        args.seconds = 60.0
    try:
        if args.force and out.exists():
            shutil.rmtree(out)
        result = train(args.flow, args.data, out, seconds=args.seconds, iters=args.iters,
                       seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                       schedule=args.schedule)
        steps, seconds = result["steps"], result["seconds"]
        print(f"trained {args.flow} ({result['model'].num_parameters():,} parameters) for "
              f"{steps} steps in {seconds:.1f} s of training; last batch NLL "
              f"{result['loss']:.4f} nats", flush=True)
        report = evaluate(load_peer(out), args.data, n_test=args.n_test)
        report.update(train_steps=steps, train_seconds=seconds, run=str(out))
        atomic_write_json(out / EVAL, report)
    except FlowlabError as err:
        print(f"flow_peers: error: {err}", file=sys.stderr)
        return 2
    print(f"test NLL        {report['nll_nats']:.4f} ± {report['nll_se']:.4f} nats (± 1 s.e., "
          f"{report['n_test']} points)")
    print(f"gap NLL - H     {report['gap_nats']:+.4f} nats")
    print(f"KL(data||model) {report['kl_nats']:+.4f} ± {report['kl_se']:.4f} nats (paired)")
    print(f"wrote {out / EVAL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
