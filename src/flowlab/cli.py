"""The `flowlab` command line: train, eval, sample, plot.

Every failure a user can cause (unknown dataset or model, malformed option, missing or corrupt
run folder) ends in one line ``flowlab: error: ...`` that says what is wrong and how to fix
it, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from flowlab.errors import ConfigError, FlowlabError, RunDirError

DEFAULT_SECONDS = 600.0


# -- argument types ----------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 64,64,64, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive widths such as 64,64,64, got {text!r}")
    return values


def _number(cast: type, minimum: float, inclusive: bool):
    """An argparse type: a finite ``cast`` number above ``minimum`` (or equal, if inclusive)."""
    bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if cast is int else 'a number'}, got {text!r}"
            ) from None
        ok = value >= minimum if inclusive else value > minimum
        if not ok or value in (float("inf"), float("-inf")) or value != value:
            raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text!r}")
        return value

    return parse


_positive_float = _number(float, 0.0, inclusive=False)
_nonnegative_float = _number(float, 0.0, inclusive=True)
_positive_int = _number(int, 1, inclusive=True)


# -- parser ------------------------------------------------------------------------------------
def _add_solver_args(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    from flowlab.ode import SOLVERS

    parser.add_argument(f"--{prefix}solver", choices=SOLVERS, default=None,
                        help="ODE solver (adaptive: dopri5, bosh3, ...; fixed: euler, midpoint, "
                             "rk4). Default: dopri5")
    parser.add_argument(f"--{prefix}atol", type=_positive_float, default=None,
                        help="absolute tolerance of adaptive solvers")
    parser.add_argument(f"--{prefix}rtol", type=_positive_float, default=None,
                        help="relative tolerance of adaptive solvers")
    parser.add_argument(f"--{prefix}steps", type=_positive_int, default=None,
                        help="number of steps of a fixed-grid solver over each block's [0, T]")


def build_parser() -> argparse.ArgumentParser:
    from flowlab.cnf import ACTIVATIONS, LAYERS

    parser = argparse.ArgumentParser(
        prog="flowlab",
        description="Train, evaluate, sample and plot likelihood-based flow models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # train
    tr = sub.add_parser(
        "train", help="train a model and write a run folder",
        description="Train a model on a dataset; writes config.json, log.jsonl, "
                    "checkpoint.safetensors and model.safetensors into --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    tr.add_argument("--data", default="8gaussians",
                    help="dataset name: 8gaussians, checkerboard, 2spirals, pinwheel, rings, "
                         "circles, moons, swissroll")
    tr.add_argument("--model", default="ffjord",
                    help="ffjord (maximum likelihood) or cfm (conditional flow matching)")
    tr.add_argument("--out", type=Path, default=None,
                    help="run folder to create (default: runs/<data>-<model>)")
    tr.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                    help="continue the run in RUN_DIR from its last checkpoint")
    tr.add_argument("--force", action="store_true",
                    help="replace an existing run folder given by --out")
    budget = tr.add_argument_group("budget")
    budget.add_argument("--iters", type=_positive_int, default=None,
                        help="number of optimizer steps")
    budget.add_argument("--seconds", type=_positive_float, default=None,
                        help=f"seconds of training (default {DEFAULT_SECONDS:g} when neither "
                             "--iters nor --seconds is given)")
    opt = tr.add_argument_group("optimization")
    opt.add_argument("--batch-size", type=_positive_int, default=512)
    opt.add_argument("--lr", type=_positive_float, default=5e-3,
                     help="peak learning rate (cosine decay over the budget by default)")
    opt.add_argument("--weight-decay", type=_nonnegative_float, default=0.0)
    opt.add_argument("--schedule", choices=("constant", "cosine"), default="cosine",
                     help="learning-rate schedule over the budget")
    opt.add_argument("--grad-clip", type=_positive_float, default=None)
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--threads", type=_positive_int, default=1,
                     help="torch CPU threads (1 is fastest for 2-D problems)")
    opt.add_argument("--checkpoint-every", type=_positive_float, default=60.0,
                     help="seconds between resume checkpoints")
    opt.add_argument("--no-progress", action="store_true", help="no progress bar")
    cnf = tr.add_argument_group("CNF model (ffjord)")
    cnf.add_argument("--hidden", type=_int_list, default=[64, 64, 64],
                     help="hidden widths of the vector field, e.g. 64,64,64")
    cnf.add_argument("--layer", choices=sorted(LAYERS), default="concatsquash",
                     help="how time enters each layer")
    cnf.add_argument("--activation", choices=sorted(ACTIVATIONS), default="tanh")
    cnf.add_argument("--num-blocks", type=_positive_int, default=1, help="stacked CNF blocks")
    cnf.add_argument("--T", type=_positive_float, default=0.5, help="initial integration time")
    cnf.add_argument("--fixed-T", action="store_true", help="do not learn T")
    cnf.add_argument("--divergence", choices=("exact", "hutchinson"), default="exact",
                     help="divergence used in training")
    cnf.add_argument("--probe", choices=("rademacher", "gaussian"), default="rademacher",
                     help="Hutchinson probe distribution")
    _add_solver_args(cnf)
    cnf.add_argument("--adjoint", action=argparse.BooleanOptionalAction, default=False,
                     help="gradients by the adjoint method (constant memory) instead of "
                          "backpropagation through the solver (faster for small models)")
    cnf.add_argument("--seminorm", action="store_true",
                     help="adjoint step control on the state only (fewer backward NFE)")
    cnf.add_argument("--kinetic", type=_nonnegative_float, default=0.0,
                     help="weight of the RNODE kinetic-energy regularizer int ||f||^2 dt")
    cnf.add_argument("--jacobian", type=_nonnegative_float, default=0.0,
                     help="weight of the RNODE Jacobian Frobenius regularizer")
    fm = tr.add_argument_group("flow matching (cfm): the same CNF, trained without ODE solves")
    fm.add_argument("--path", choices=("linear", "vp"), default="linear",
                    help="probability path between data (t=0) and noise (t=1)")
    fm.add_argument("--sigma-min", type=_nonnegative_float, default=1e-4,
                    help="width of the linear path at the data end")
    fm.add_argument("--coupling", choices=("independent", "ot"), default="independent",
                    help="pair data and noise independently or by minibatch optimal transport")

    # eval
    ev = sub.add_parser(
        "eval", help="test NLL (nats) with standard error, gap to the true entropy",
        description="Evaluate a run on fresh held-out points (fixed seed) with the exact "
                    "divergence and a tight tolerance; prints a table and writes eval.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ev.add_argument("run", type=Path, help="run folder written by `flowlab train`")
    ev.add_argument("--n-test", type=_positive_int, default=20000, help="number of test points")
    ev.add_argument("--batch-size", type=_positive_int, default=10000)
    ev.add_argument("--divergence", choices=("exact", "hutchinson"), default="exact")
    _add_solver_args(ev)
    ev.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                    help="precision of the evaluation")
    ev.add_argument("--threads", type=_positive_int, default=None)

    # sample
    sa = sub.add_parser("sample", help="draw samples from a trained model",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sa.add_argument("run", type=Path)
    sa.add_argument("-n", "--num", type=_positive_int, default=1000, help="number of samples")
    sa.add_argument("--out", type=Path, default=None,
                    help="output file, .npy or .csv (default: RUN/samples.npy)")
    sa.add_argument("--seed", type=int, default=0)
    _add_solver_args(sa)

    # plot
    pl = sub.add_parser("plot", help="density heat maps, samples, training curves, flow GIF",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pl.add_argument("run", type=Path)
    pl.add_argument("--resolution", type=_positive_int, default=200,
                    help="grid points per axis of the heat maps")
    pl.add_argument("--gif", action=argparse.BooleanOptionalAction, default=True,
                    help="write the flow animation")
    pl.add_argument("--seed", type=int, default=0)
    return parser


# -- helpers -----------------------------------------------------------------------------------
def _solver_from_args(args: argparse.Namespace, base, prefix: str = ""):
    from flowlab.ode import SolverConfig

    changes: dict[str, Any] = {}
    solver = getattr(args, f"{prefix}solver")
    atol, rtol, steps = (getattr(args, f"{prefix}{k}") for k in ("atol", "rtol", "steps"))
    if solver is not None:
        changes["solver"] = solver
    if atol is not None:
        changes["atol"] = atol
    if rtol is not None:
        changes["rtol"] = rtol
    if steps is not None:
        changes["steps"] = steps
        changes["step_size"] = None
    base = base or SolverConfig()
    return base.replace(**changes) if changes else base


def _set_threads(n: int | None) -> None:
    import torch

    if n is not None:
        torch.set_num_threads(n)


def _model_options(args: argparse.Namespace, dim: int) -> dict[str, Any]:
    from flowlab.ode import SolverConfig

    solver = _solver_from_args(args, SolverConfig(
        gradient="adjoint" if args.adjoint else "backprop", seminorm=args.seminorm
    ))
    if args.seminorm and not args.adjoint:
        raise ConfigError("--seminorm only applies with --adjoint")
    options = {
        "dim": dim, "hidden": args.hidden, "layer": args.layer, "activation": args.activation,
        "num_blocks": args.num_blocks, "T": args.T, "train_T": not args.fixed_T,
        "divergence": args.divergence, "probe": args.probe, "solver": solver.to_dict(),
        "kinetic": args.kinetic, "jacobian": args.jacobian,
    }
    if args.model == "cfm":
        # The path fixes the flow: one block on [0, 1]; no ODE is solved in training.
        options.update(num_blocks=1, T=1.0, train_T=False, path=args.path,
                       sigma_min=args.sigma_min, coupling=args.coupling)
    return options


def _write_json(path: Path, obj: Any) -> None:
    from flowlab.train.checkpoint import atomic_write_json

    atomic_write_json(path, obj)


# -- commands ----------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from flowlab import __version__
    from flowlab.data import get_dataset
    from flowlab.eval import heldout_points
    from flowlab.models import build_model
    from flowlab.train import TrainConfig, train
    from flowlab.train.checkpoint import CONFIG, read_run_config

    _set_threads(args.threads)
    if args.resume is not None:
        run_dir = args.resume
        config = read_run_config(run_dir)
        dataset = get_dataset(config["dataset"])
        train_options = config["train"]
        if args.iters is not None or args.seconds is not None:
            train_options = {**train_options, "iters": args.iters, "seconds": args.seconds}
        train_config = TrainConfig(**train_options)
        torch.manual_seed(train_config.seed)
        model = build_model(config["model"], **config["model_options"])
        resume = True
    else:
        dataset = get_dataset(args.data)
        seconds = args.seconds
        if args.iters is None and seconds is None:
            seconds = DEFAULT_SECONDS
        train_config = TrainConfig(
            iters=args.iters, seconds=seconds, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, schedule=args.schedule, grad_clip=args.grad_clip,
            checkpoint_every=args.checkpoint_every, seed=args.seed,
        )
        torch.manual_seed(args.seed)
        model = build_model(args.model, **_model_options(args, dataset.dim))
        run_dir = args.out or Path("runs") / f"{dataset.name}-{model.name}"
        if run_dir.exists() and any(run_dir.iterdir()):
            if not args.force:
                raise RunDirError(
                    f"run folder {run_dir} already exists; choose another --out, continue it "
                    f"with --resume {run_dir}, or replace it with --force"
                )
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "flowlab_version": __version__, "dataset": dataset.name, "model": model.name,
            "model_options": model.config(), "train": train_config.to_dict(),
        }
        _write_json(run_dir / CONFIG, config)
        resume = False

    val = heldout_points(dataset, train_config.val_size, seed=10_000 + train_config.seed)
    print(f"training {model.name} ({model.num_parameters():,} parameters) on {dataset.name} "
          f"(true entropy H = {dataset.entropy:.4f} nats) into {run_dir}")
    result = train(
        model, lambda n, gen: dataset.sample(n, generator=gen), train_config, run_dir,
        resume=resume, progress=not args.no_progress, val_points=val.float(),
    )
    last = result.last_metrics
    objective = (f"last batch NLL {last['nll']:.4f} nats" if "nll" in last
                 else f"last batch loss {last.get('loss', float('nan')):.4f}")
    print(f"done: {result.steps} steps in {result.seconds:.1f} s of training; {objective}, "
          f"NFE {last.get('nfe_forward', 0):.0f}")
    print(f"next: flowlab eval {run_dir}  and  flowlab plot {run_dir}")
    return 0


def _load(run: Path):
    from flowlab.data import get_dataset
    from flowlab.train import load_run

    model, config = load_run(run)
    return model, config, get_dataset(config["dataset"])


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from flowlab.eval import evaluate_nll, heldout_points

    _set_threads(args.threads)
    model, config, dataset = _load(args.run)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    model = model.to(dtype)
    solver = _solver_from_args(args, model.eval_solver)
    points = heldout_points(dataset, args.n_test).to(dtype)
    result = evaluate_nll(
        model, points, batch_size=args.batch_size, solver=solver, divergence=args.divergence,
        entropy=dataset.entropy, reference=dataset,
    )
    report = {
        "dataset": dataset.name, "model": config["model"], **result.to_dict(),
        "dtype": args.dtype, "run": str(args.run),
    }
    _write_json(args.run / "eval.json", report)
    rows = [
        ("dataset", dataset.name), ("model", config["model"]),
        ("test NLL", f"{result.nll_nats:.4f} ± {result.nll_se:.4f} nats (± 1 s.e.)"),
        ("true entropy H", f"{dataset.entropy:.4f} nats"),
        ("gap NLL - H", f"{result.gap_nats:+.4f} nats"),
        ("KL(data||model)", f"{result.kl_nats:+.4f} ± {result.kl_se:.4f} nats (paired with "
                            "the true density on the same points)"),
        ("test points", f"{result.n_test}"),
        ("divergence", result.estimator), ("solver", f"{result.solver}, {args.dtype}"),
        ("NFE per solve", f"{result.nfe:.0f}" if result.nfe is not None else "-"),
        ("seconds", f"{result.seconds:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(f"wrote {args.run / 'eval.json'}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    model, _, _ = _load(args.run)
    model.eval_solver = _solver_from_args(args, model.eval_solver)
    model.eval()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    samples = model.sample((args.num,)).cpu().numpy()
    out = args.out or args.run / "samples.npy"
    if out.suffix == ".csv":
        np.savetxt(out, samples, delimiter=",")
    elif out.suffix == ".npy":
        np.save(out, samples)
    else:
        raise ConfigError(f"unknown sample file type {out.suffix!r}; use .npy or .csv")
    print(f"wrote {args.num} samples to {out} in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    import torch

    from flowlab import viz
    from flowlab.train.checkpoint import LOG

    model, config, dataset = _load(args.run)
    model.eval()
    torch.manual_seed(args.seed)
    plot_solver = model.eval_solver.replace(atol=1e-5, rtol=1e-5)
    written = []
    info = viz.plot_density_comparison(
        model, dataset, args.run / "density.png", resolution=args.resolution, solver=plot_solver
    )
    written.append(info["path"])
    with torch.no_grad():
        samples = model.sample((5000,))
    written.append(viz.plot_samples(samples, args.run / "samples.png", dataset.bounds,
                                    f"{config['model']} samples ({dataset.name})"))
    log_path = args.run / LOG
    if log_path.is_file():
        records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        written.append(viz.plot_training_curves(records, args.run / "training.png",
                                                entropy=dataset.entropy))
    if args.gif:
        written.append(viz.animate_flow(model, args.run / "flow.gif", bounds=dataset.bounds))
    print(f"model density integrates to {info['model_mass']:.4f} on the plot grid")
    for path in written:
        print(f"wrote {path}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "plot": cmd_plot}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except FlowlabError as err:
        print(f"flowlab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
