"""Does torch.compile make a CNF's vector field faster on this CPU? Eager against compiled.

Issue 3 asks that each speed option be measured before it is kept. This measures
``torch.compile`` of the vector field's forward (inductor, the default backend) for the model
``flowlab train --model cfm`` builds on 2-D data, side by side in one process, on the same
weights and batches, interleaved so that machine noise hits both alike:

- a flow-matching training step (forward, backward, AdamW) on a batch of 512 points;
- one evaluation of the field on 10,000 points without gradients (the cost of one function
  evaluation when sampling);
- the exact log-density of 2,000 points by the ODE in float64 (rk4, 16 steps: the field and
  its input-gradients for the divergence, a fixed number of evaluations so both do the same
  work).

Reports the median seconds of each over ``--repeats`` repeats, the ratio compiled / eager,
the one-off compile time, and the largest difference of the results (compiled code may
reorder floating-point sums). The log-density takes one input-gradient per dimension from a
retained graph, which a compiled backward only allows with torch's private
``torch._functorch.config.donated_buffer = False`` (set here for that part alone).
Maximum-likelihood training with the exact divergence needs
the second derivative through the field, which torch.compile does not give (double backward),
so it is not measured.

Usage: ``python benchmarks/compile_field.py [--repeats 15] [--threads 1]``; writes
``benchmarks/results/compile_field.md``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path

import torch

from flowlab.cli import CFM_HIDDEN
from flowlab.data import get_dataset
from flowlab.models import build_model
from flowlab.ode import SolverConfig

FIXED = SolverConfig(solver="rk4", steps=16)


def compiled_copy(model: torch.nn.Module) -> tuple[torch.nn.Module, float]:
    """A copy whose field's forward is compiled (weights and state-dict keys unchanged), and
    the seconds the first call took (the compilation)."""
    twin = copy.deepcopy(model)
    field = twin.blocks[0].field
    field.forward = torch.compile(field.forward)
    like = next(twin.parameters())
    start = time.perf_counter()
    field(like.new_zeros(512), like.new_zeros(512, 2))
    return twin, time.perf_counter() - start


def train_step(model, optimizer, batch: torch.Tensor) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    model.training_loss(batch).loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def field_pass(model, points: torch.Tensor) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.blocks[0].field(torch.full((len(points),), 0.5, dtype=points.dtype), points)
    return time.perf_counter() - start, out


def log_density(model, points: torch.Tensor) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.no_grad():  # as `flowlab eval`: the divergence's input-gradients only
        logp = model.log_prob(points, solver=FIXED, divergence="exact")
    return time.perf_counter() - start, logp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="rings")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = get_dataset(args.data)
    eager = build_model("cfm", dim=2, hidden=CFM_HIDDEN)  # the field `flowlab train` builds
    eager.train()
    compiled, compile_seconds = compiled_copy(eager)
    models = {"eager": eager, "compiled": compiled}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    gen = torch.Generator().manual_seed(1)
    wide = data.sample(10_000, generator=gen)
    test = data.sample(2_000, generator=gen)
    timings = {k: {"train": [], "field": [], "log_prob": []} for k in models}
    # warm-up: the first calls of each kind compile (training: the backward graph too)
    for name, model in models.items():
        start = time.perf_counter()
        train_step(model, optimizers[name], data.sample(512, generator=gen))
        timings[name]["first_train"] = time.perf_counter() - start
        field_pass(model, wide)
    print(f"compiled the field in {compile_seconds:.1f} s (forward), first training step "
          f"{timings['compiled']['first_train']:.1f} s", flush=True)
    for repeat in range(args.repeats):
        batch = data.sample(512, generator=gen)
        for name, model in models.items():  # interleaved
            timings[name]["train"].append(train_step(model, optimizers[name], batch))
            timings[name]["field"].append(field_pass(model, wide)[0])
        print(f"repeat {repeat + 1} of {args.repeats}", flush=True)
    # the log-density in float64, of one set of weights (eager's, after its training steps)
    results = {}
    # The divergence takes one input-gradient per dimension from the same graph (retained);
    # a compiled backward that donates its buffers refuses that, so they are kept for this.
    torch._functorch.config.donated_buffer = False
    eager64 = copy.deepcopy(eager).double().eval()
    float64 = {"eager": eager64, "compiled": compiled_copy(eager64)[0].eval()}
    for name in float64:  # the float64 graph with its input-gradients compiles on first use
        log_density(float64[name], test.double())
    for _ in range(max(3, args.repeats // 3)):
        for name, model in float64.items():
            seconds, results[name] = log_density(model, test.double())
            timings[name]["log_prob"].append(seconds)
    field_diff = float((field_pass(float64["eager"], test.double())[1]
                        - field_pass(float64["compiled"], test.double())[1]).abs().max())
    logp_diff = float((results["eager"] - results["compiled"]).abs().max())
    rows = []
    for what, label in (("train", "flow-matching training step, batch 512"),
                        ("field", "field forward, 10,000 points, no gradient"),
                        ("log_prob", "exact log-density, 2,000 points, float64, rk4 x 16")):
        e = statistics.median(timings["eager"][what])
        c = statistics.median(timings["compiled"][what])
        rows.append(f"| {label} | {e * 1e3:.2f} | {c * 1e3:.2f} | {c / e:.2f} |")
    report = "\n".join([
        "# torch.compile of the vector field",
        "",
        f"Command: `python benchmarks/compile_field.py --data {args.data} --repeats "
        f"{args.repeats} --threads {args.threads}`  ",
        f"Machine: {platform.machine()}, {platform.python_version()}, torch "
        f"{torch.__version__}, {args.threads} thread(s).  ",
        f"Model: `flowlab train --model cfm` defaults on {args.data} "
        f"({sum(p.numel() for p in eager.parameters()):,} parameters). Medians over "
        f"{args.repeats} interleaved repeats (log-density: "
        f"{len(timings['eager']['log_prob'])}).",
        "",
        "| what | eager (ms) | compiled (ms) | compiled / eager |",
        "|---|---|---|---|",
        *rows,
        "",
        f"One-off cost: the first compiled forward took {compile_seconds:.1f} s and the first "
        f"compiled training step {timings['compiled']['first_train']:.1f} s (eager: "
        f"{timings['eager']['first_train'] * 1e3:.0f} ms); inductor keeps compiled code in an "
        "on-disk cache, so a second run of this script pays less than the first.  ",
        f"Agreement in float64 on the same weights: field max |difference| {field_diff:.1e}, "
        f"log-density max |difference| {logp_diff:.1e} nats.",
        "",
    ])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_field.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
