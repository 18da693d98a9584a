"""The `flowlab` command line: train, eval, sample, plot.

Every failure a user can cause (unknown dataset or model, malformed option, missing or corrupt
run folder) ends in one line ``flowlab: error: ...`` that says what is wrong and how to fix
it, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from flowlab.errors import ConfigError, FlowlabError, RunDirError

DEFAULT_SECONDS = 600.0
FFJORD_HIDDEN = [64, 64, 64]
# Measured on rings with OT-CFM, 150 s of training: gap 0.32 nats with 256 x 3, 0.11 with
# 256 x 4, 0.03 with 256 x 5 (64 x 3: 0.54).
CFM_HIDDEN = [256] * 5


# -- argument types ----------------------------------------------------------------------------
def _positive_list(cast: type, what: str, example: str):
    """An argparse type: comma-separated positive finite ``cast`` values, e.g. ``example``."""

    def parse(text: str) -> list:
        try:
            values = [cast(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or any(not (0 < v < float("inf")) for v in values):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated positive {what} such as {example}, got {text!r}"
            )
        return values

    return parse


_int_list = _positive_list(int, "widths", "64,64,64")
_seconds_list = _positive_list(float, "seconds", "60,180,600")


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
                    "checkpoints/ and model.safetensors into --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    tr.add_argument("--data", default="8gaussians",
                    help="dataset name: 8gaussians, checkerboard, 2spirals, pinwheel, rings, "
                         "circles, moons, swissroll (2-D, with true entropies); or images: "
                         "digits (scikit-learn's 8x8), mnist, fashion-mnist, cifar10 (read from "
                         "--data-dir)")
    tr.add_argument("--data-dir", type=Path, default=None, metavar="FOLDER",
                    help="folder holding the image files (MNIST IDX files, CIFAR-10 batches)")
    tr.add_argument("--alpha", type=_nonnegative_float, default=0.05,
                    help="images: margin of the logit transform logit(alpha + (1-2 alpha) x)")
    tr.add_argument("--no-logit", action="store_true",
                    help="images: model the dequantized pixels on [0, 1) directly")
    tr.add_argument("--dequantization", choices=("uniform", "variational"), default="uniform",
                    help="images: uniform noise in each pixel's cell, or a learned noise "
                         "distribution q(u|x) (a small conditional flow, Flow++) trained with "
                         "the model on the variational bound; bits/dim stay an upper bound, a "
                         "tighter one")
    tr.add_argument("--model", default="ffjord",
                    help="ffjord (CNF, maximum likelihood), ffjord-multiscale (FFJORD's "
                         "multiscale CNF for images), cfm (CNF, flow matching), or a "
                         "discrete flow: planar, radial, nice, realnvp, glow, maf, iaf, "
                         "nsf-coupling, nsf-ar")
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
    faults = tr.add_argument_group("checkpoints and faults")
    faults.add_argument("--checkpoint-every", type=_positive_float, default=60.0,
                        help="seconds of training between resume checkpoints")
    faults.add_argument("--checkpoint-every-steps", type=_positive_int, default=None,
                        help="also write a checkpoint every this many steps")
    faults.add_argument("--keep-checkpoints", type=_positive_int, default=3,
                        help="newest checkpoints kept in RUN/checkpoints/")
    faults.add_argument("--on-nonfinite", choices=("restore", "stop"), default="restore",
                        help="on a NaN/Inf loss or gradient or a failed ODE solve: restore the "
                             "last good state with half the learning rate, or stop")
    faults.add_argument("--max-restores", type=_number(int, 0, inclusive=True), default=3,
                        help="restores allowed before the run stops with the error")
    opt.add_argument("--ema", type=_number(float, 0.0, inclusive=True), default=0.0,
                     help="decay of an exponential moving average of the weights, e.g. 0.999 "
                          "(0: off); the saved model holds the averaged weights")
    opt.add_argument("--val-every", type=_number(int, 0, inclusive=True), default=10,
                     metavar="N", help="validate N times over the budget (0: never)")
    opt.add_argument("--keep-best", action="store_true",
                     help="keep the weights with the lowest validation NLL (model selection on "
                          "the validation split, e.g. against overfitting a small image set); "
                          "saved as the run's model instead of the last weights")
    opt.add_argument("--snapshot-at", type=_seconds_list, default=[], metavar="S1,S2,...",
                     help="training times (s) at which to save weights to RUN/snapshots/")
    opt.add_argument("--init", type=Path, default=None, metavar="RUN_DIR",
                     help="start from the weights of a trained run (its architecture is used): "
                          "e.g. fine-tune a cfm model by maximum likelihood with --model ffjord")
    opt.add_argument("--no-progress", action="store_true", help="no progress bar")
    cnf = tr.add_argument_group("CNF model (ffjord, ffjord-multiscale)")
    cnf.add_argument("--hidden", type=_int_list, default=None,
                     help="hidden widths of the vector field, e.g. 64,64,64 (default: "
                          "64,64,64 for ffjord; 256 x 5 for cfm, whose training steps are cheap "
                          "and which needs the depth for sharp densities, measured on rings)")
    cnf.add_argument("--field", choices=("mlp", "fourier", "conv", "unet"), default=None,
                     help="vector field: mlp (2-D data and flattened images), fourier (an MLP "
                          "on Fourier features of the state and time: sharp densities in far "
                          "fewer steps), conv (FFJORD's convolutional field) or unet (flow "
                          "matching); default: mlp, and on images conv for ffjord, unet for cfm")
    cnf.add_argument("--fourier-features", type=_positive_int, default=64,
                     help="fourier field: number of random frequencies")
    cnf.add_argument("--fourier-scale", type=_positive_float, default=3.0,
                     help="fourier field: standard deviation of the frequencies (data units)")
    cnf.add_argument("--layer", choices=sorted(LAYERS), default="concatsquash",
                     help="how time enters each layer")
    cnf.add_argument("--activation", choices=sorted(ACTIVATIONS), default="tanh")
    cnf.add_argument("--num-blocks", type=_positive_int, default=None,
                     help="stacked CNF blocks (default 1); for ffjord-multiscale the blocks "
                          "per scale, before and again after each squeeze (default 2); or "
                          "layers/steps of a discrete flow (default: the family's)")
    cnf.add_argument("--scales", type=_positive_int, default=None,
                     help="ffjord-multiscale: number of scales (default 2); image sides must "
                          "be divisible by 2^(scales-1)")
    cnf.add_argument("--T", type=_positive_float, default=0.5, help="initial integration time")
    cnf.add_argument("--fixed-T", action="store_true", help="do not learn T")
    cnf.add_argument("--divergence", choices=("exact", "hutchinson"), default=None,
                     help="divergence used in training (default: exact; hutchinson for images "
                          "with a conv or unet field)")
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
    df = tr.add_argument_group("discrete flows (planar ... nsf-ar)")
    df.add_argument("--batch-norm", action="store_true",
                    help="batch normalization between layers (realnvp, maf)")
    df.add_argument("--bins", type=_positive_int, default=None,
                    help="spline bins (nsf-coupling, nsf-ar; default 8)")
    df.add_argument("--bound", type=_positive_float, default=None,
                    help="splines act on [-bound, bound], identity outside (default 4)")
    df.add_argument("--log-scale-bound", type=_positive_float, default=None,
                    help="maf, iaf: each step's scale softplus(r + r0) + e^-c is at least "
                         "e^-c (default c = 7: about 1/1000)")
    fm = tr.add_argument_group("flow matching (cfm): the same CNF, trained without ODE solves")
    fm.add_argument("--path", choices=("linear", "vp"), default="linear",
                    help="probability path between data (t=0) and noise (t=1)")
    fm.add_argument("--sigma-min", type=_nonnegative_float, default=1e-4,
                    help="width of the linear path at the data end")
    fm.add_argument("--coupling", choices=("independent", "ot"), default="independent",
                    help="pair data and noise independently or by minibatch optimal transport")
    fm.add_argument("--ot-block", type=_positive_int, default=128,
                    help="points per exact OT assignment (the batch is matched in blocks)")
    fm.add_argument("--ot-solver", choices=("auto", "pot", "scipy"), default="auto",
                    help="assignment solver; auto: POT if installed, else scipy")
    fm.add_argument("--reflow", type=Path, default=None, metavar="TEACHER_RUN",
                    help="rectified flow: train on (data, noise) pairs made by a trained CNF "
                         "(its architecture and weights are the start), straightening the "
                         "paths for few-step sampling")
    fm.add_argument("--pairs", type=_positive_int, default=20000,
                    help="number of teacher pairs for --reflow")
    fm.add_argument("--time-sampling", choices=("uniform", "logit-normal"), default="uniform",
                    help="distribution of the training times on [0, 1]")
    fm.add_argument("--target", choices=("conditional", "averaged"), default="conditional",
                    help="regression target: each pair's conditional velocity, or its "
                         "posterior average over the batch (lower variance, same field; "
                         "independent coupling only)")
    fm.add_argument("--sobolev", type=float, default=0.0, metavar="WEIGHT",
                    help="with --target averaged on low-dimensional data: also regress the "
                         "field's Jacobian on the averaged target's, with this weight (0: off; "
                         "0.05 was measured on the 2-D densities)")
    fm.add_argument("--sobolev-from", type=float, default=0.25, metavar="T",
                    help="earliest path time of the rows the Sobolev term uses")
    fm.add_argument("--sobolev-rows", type=_positive_int, default=64, metavar="N",
                    help="rows per batch the Sobolev term uses")

    # eval
    ev = sub.add_parser(
        "eval", help="test NLL (nats) with standard error, gap to the true entropy",
        description="Evaluate a run on fresh held-out points (fixed seed) with the exact "
                    "divergence and a tight tolerance; prints a table and writes eval.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ev.add_argument("run", type=Path, help="run folder written by `flowlab train`")
    ev.add_argument("--n-test", type=_positive_int, default=None,
                    help="number of test points (2-D data: 20000 fresh points) or a random "
                         "subset of test images (default: the whole test set)")
    ev.add_argument("--batch-size", type=_positive_int, default=10000)
    ev.add_argument("--divergence", choices=("exact", "hutchinson"), default=None,
                    help="CNFs: the divergence of the evaluation solve (default: the model's "
                         "eval_divergence: exact, except ffjord-multiscale: hutchinson)")
    ev.add_argument("--probes", type=_positive_int, default=None, metavar="K",
                    help="image runs: score each test image K times with independent draws "
                         "(Hutchinson probes; the noise of variational dequantization) and "
                         "average, reporting the estimator's standard error too (K >= 2). "
                         "Default: 1 for a deterministic score (exact divergence, uniform "
                         "dequantization), 4 for a stochastic one")
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
    sa.add_argument("--quality", action=argparse.BooleanOptionalAction, default=True,
                    help="score the samples against the true density: cross-entropy (nats) "
                         "and MMD^2 to fresh data points")

    # plot
    pl = sub.add_parser("plot", help="density heat maps, samples, training curves, flow GIF",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pl.add_argument("run", type=Path)
    pl.add_argument("--resolution", type=_positive_int, default=200,
                    help="grid points per axis of the heat maps")
    pl.add_argument("--gif", action=argparse.BooleanOptionalAction, default=True,
                    help="write the flow animation (CNFs; on images: test images carried to "
                         "noise and back, with the vector field)")
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--threads", type=_positive_int, default=None)
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


def _flow_options(args: argparse.Namespace, shape: tuple[int, ...]) -> dict[str, Any]:
    """Options of a discrete flow family from the command line (only those given)."""
    options: dict[str, Any] = (
        {"dim": shape[0]} if len(shape) == 1 else {"image_shape": list(shape)})
    if args.num_blocks is not None:
        options["num_blocks"] = args.num_blocks
    if args.hidden is not None:
        if args.model in ("planar", "radial"):
            raise ConfigError(f"{args.model} layers have no hidden network; drop --hidden")
        options["hidden"] = args.hidden
    if args.batch_norm:
        if args.model not in ("realnvp", "maf"):
            raise ConfigError("--batch-norm applies to realnvp and maf")
        options["batch_norm"] = True
    if args.log_scale_bound is not None:
        if args.model not in ("maf", "iaf"):
            raise ConfigError("--log-scale-bound applies to maf and iaf")
        options["log_scale_bound"] = args.log_scale_bound
    for name in ("bins", "bound"):
        if getattr(args, name) is not None:
            if not args.model.startswith("nsf"):
                raise ConfigError(f"--{name} applies to the spline flows nsf-coupling, nsf-ar")
            options[name] = getattr(args, name)
    return options


def _model_options(args: argparse.Namespace, shape: tuple[int, ...]) -> dict[str, Any]:
    from flowlab.models import FAMILIES
    from flowlab.ode import FIXED_GRID_SOLVERS, SolverConfig

    if getattr(args, "sobolev", 0.0) and args.model != "cfm":
        raise ConfigError("--sobolev is a flow-matching option: use it with --model cfm "
                          "--target averaged")
    if args.model in FAMILIES:
        return _flow_options(args, shape)
    if args.scales is not None and args.model != "ffjord-multiscale":
        raise ConfigError("--scales applies to ffjord-multiscale")

    if args.seminorm and not args.adjoint:
        raise ConfigError("--seminorm only applies with --adjoint")
    solver = _solver_from_args(args, SolverConfig(
        gradient="adjoint" if args.adjoint else "backprop", seminorm=args.seminorm
    ))
    if args.model == "ffjord-multiscale":
        return _multiscale_options(args, shape, solver)
    field = _cnf_field(args, shape)
    images = len(shape) == 3
    hidden = args.hidden or (IMAGE_HIDDEN[field] if images else FOURIER_HIDDEN
                             if field == "fourier" else CFM_HIDDEN if args.model == "cfm"
                             else FFJORD_HIDDEN)
    divergence = args.divergence or ("hutchinson" if images else "exact")
    options = {
        "dim": None if images else shape[0], "hidden": hidden, "layer": args.layer,
        "activation": args.activation,
        "num_blocks": args.num_blocks or 1, "T": args.T, "train_T": not args.fixed_T,
        "divergence": divergence, "probe": args.probe, "solver": solver.to_dict(),
        "kinetic": args.kinetic, "jacobian": args.jacobian, "field": field,
        # (used by the fourier field only; always given so that --init can carry them)
        "fourier_features": args.fourier_features, "fourier_scale": args.fourier_scale,
    }
    if field == "fourier" and args.activation == "tanh":
        options["activation"] = "swish"  # the default for this field
    if images:
        options.update(image_shape=list(shape), field=field)
        if args.activation == "tanh" and field == "conv":
            options["activation"] = "softplus"  # FFJORD's choice for images
    if args.model != "cfm" and solver.solver in FIXED_GRID_SOLVERS:
        warnings.warn(
            f"maximum-likelihood training with the fixed-step solver {solver.solver} fits the "
            f"likelihood of the discretized flow, which can fall below the exact one while the "
            f"exact likelihood gets worse (measured on 8gaussians: rk4 with 2 steps trained to "
            f"2.50 nats against H = 2.83, exact NLL 4.1). Validation (--val-every), flowlab eval "
            f"and sampling use the adaptive solver; watch val_nll, use --keep-best, and prefer "
            f"at least rk4 with 4 steps", stacklevel=2)
    if args.model == "cfm":
        # The path fixes the flow: one block on [0, 1]; no ODE is solved in training.
        options.update(num_blocks=1, T=1.0, train_T=False, path=args.path,
                       sigma_min=args.sigma_min, coupling=args.coupling, ot_block=args.ot_block,
                       ot_solver=args.ot_solver, time_sampling=args.time_sampling,
                       target=args.target, sobolev=args.sobolev,
                       sobolev_from=args.sobolev_from, sobolev_rows=args.sobolev_rows)
    return options


def _multiscale_options(args: argparse.Namespace, shape: tuple[int, ...],
                        solver) -> dict[str, Any]:
    """Options of FFJORD's multiscale CNF (images only, its convolutional field)."""
    if len(shape) != 3:
        raise ConfigError("ffjord-multiscale models images: use --data digits, mnist, "
                          "fashion-mnist or cifar10, or --model ffjord for 2-D data")
    if args.field not in (None, "conv"):
        raise ConfigError("ffjord-multiscale uses FFJORD's convolutional field; drop --field")
    return {
        "image_shape": list(shape), "scales": args.scales or 2,
        "blocks_per_scale": args.num_blocks or 2, "hidden": args.hidden or IMAGE_HIDDEN["conv"],
        "strides": None, "layer": args.layer,
        # FFJORD's choice for images, unless another activation than the default is asked for
        "activation": "softplus" if args.activation == "tanh" else args.activation,
        "T": args.T, "train_T": not args.fixed_T,
        "divergence": args.divergence or "hutchinson", "probe": args.probe,
        "solver": solver.to_dict(), "kinetic": args.kinetic, "jacobian": args.jacobian,
    }


ARCHITECTURE = ("dim", "hidden", "layer", "activation", "num_blocks", "T", "scales",
                "blocks_per_scale", "strides", "field", "fourier_features", "fourier_scale")


def _init_weights(run: Path, options: dict[str, Any], dataset: str) -> dict:
    """Weights of the run given to ``--init``; its architecture replaces the one in ``options``."""
    from flowlab.train.checkpoint import WEIGHTS, load_tensors, read_run_config

    config = read_run_config(run)
    if config["dataset"] != dataset:
        raise ConfigError(f"--init {run} was trained on {config['dataset']!r}, not {dataset!r}")
    source = config["model_options"]
    for key in ARCHITECTURE:
        if key in source and key in options:  # (the target model's own options only)
            options[key] = source[key]
    tensors, _ = load_tensors(run / WEIGHTS)
    field = source.get("field") or "mlp"
    kind = (f"fourier field, {source.get('fourier_features')} frequencies" if field == "fourier"
            else source.get("layer") if field == "mlp" else f"{field} field")
    print(f"starting from the weights of {run} ({config['model']}: hidden {source.get('hidden')}, "
          f"{kind}, {source.get('activation')})")
    return tensors


def _load_init(model, tensors: dict, run: Path) -> None:
    state = {k.removeprefix("model."): v for k, v in tensors.items()}
    own = model.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise ConfigError(f"--init {run}: its weights do not fit a {model.name} model (different "
                          "parameters); initialize only from a CNF of the same kind")
    model.load_state_dict(state)


PAIRS = "pairs.safetensors"
PAIR_SOLVER = {"solver": "dopri5", "atol": 1e-5, "rtol": 1e-5}


def _make_pairs(teacher_run: Path, n: int, run_dir: Path, seed: int, progress: bool) -> dict:
    """Noise and the teacher's samples from it, written to RUN/pairs.safetensors."""
    import torch

    from flowlab.errors import NonFiniteError
    from flowlab.ode import SolverConfig
    from flowlab.train import load_run
    from flowlab.train.checkpoint import save_tensors

    teacher, _ = load_run(teacher_run)
    if not hasattr(teacher, "to_data"):
        raise ConfigError(f"--reflow {teacher_run}: the teacher must be a CNF run")
    teacher.eval()
    solver = SolverConfig(**PAIR_SOLVER)
    generator = torch.Generator().manual_seed(20_000 + seed)
    z = torch.randn(n, *teacher.event_shape, generator=generator)
    chunks = range(0, n, 5000)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="teacher pairs", unit="chunk")
    with torch.no_grad():
        x = torch.cat([teacher.to_data(z[i:i + 5000], solver=solver) for i in chunks])
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"--reflow {teacher_run}: the teacher produced non-finite samples")
    info = {"teacher": str(teacher_run), "pairs": n, "solver": PAIR_SOLVER, "seed": 20_000 + seed}
    save_tensors(run_dir / PAIRS, {"x": x, "z": z}, info)
    print(f"wrote {n} teacher pairs to {run_dir / PAIRS}")
    return info


def _pair_sampler(run_dir: Path):
    """Minibatches of the stored (data, noise) pairs, drawn with replacement."""
    import torch

    from flowlab.train.checkpoint import load_tensors

    tensors, _ = load_tensors(run_dir / PAIRS)
    x, z = tensors["x"], tensors["z"]

    def sample(n: int, generator: torch.Generator):
        index = torch.randint(x.shape[0], (n,), generator=generator)
        return x[index], z[index]

    return sample


def _write_json(path: Path, obj: Any) -> None:
    from flowlab.train.checkpoint import atomic_write_json

    atomic_write_json(path, obj)


IMAGE_HIDDEN = {"conv": [64, 64, 64], "unet": [32, 64]}
FOURIER_HIDDEN = [256] * 4


def _cnf_field(args: argparse.Namespace, shape: tuple[int, ...]) -> str:
    """The vector field of a CNF: mlp (or fourier) on vectors; conv (ffjord) or unet (cfm) on
    images."""
    if len(shape) == 1:
        if args.field not in (None, "mlp", "fourier"):
            raise ConfigError(f"--field {args.field} is for images; vectors take mlp or fourier")
        return args.field or "mlp"
    if args.field == "fourier":
        raise ConfigError("--field fourier is for vectors (and flattened images)")
    return args.field or ("unet" if args.model == "cfm" else "conv")


def _open_data(args: argparse.Namespace):
    """The toy density or the image task that ``--data`` names."""
    from flowlab.data import IMAGE_DATASETS, get_dataset

    if args.data in IMAGE_DATASETS:
        from flowlab.data.image_task import ImageTask, default_layout

        if args.reflow is not None:
            raise ConfigError("--reflow is for the 2-D densities; drop it for images")
        alpha = None if args.no_logit else args.alpha
        if args.data != "digits" and args.data_dir is None:
            raise ConfigError(f"--data {args.data} is read from its standard files: give the "
                              "folder holding them with --data-dir (nothing is downloaded)")
        folder = None if args.data_dir is None else str(args.data_dir)
        cnf_on_pixels = args.model in ("ffjord", "cfm") and args.field not in ("mlp", "fourier")
        layout = "image" if cnf_on_pixels else default_layout(args.model)
        return ImageTask(args.data, folder, alpha, layout, dequantization=args.dequantization)
    if args.dequantization != "uniform":
        raise ConfigError(f"--dequantization is for image data sets; {args.data!r} is "
                          "continuous, drop it")
    if args.data_dir is not None:
        raise ConfigError(f"--data-dir is for image data sets; {args.data!r} is generated, "
                          "drop --data-dir")
    return get_dataset(args.data)


def _data_from_config(config: dict[str, Any]):
    from flowlab.data import get_dataset

    if "data" in config:
        from flowlab.data.image_task import ImageTask

        return ImageTask.from_config(config["data"])
    return get_dataset(config["dataset"])


def _is_images(data) -> bool:
    return hasattr(data, "to_pixels")


def _has_progress(run_dir: Path) -> bool:
    """Whether a run folder holds any training (a checkpoint or a log record)."""
    from flowlab.train.checkpoint import LOG, list_checkpoints

    log = run_dir / LOG
    return bool(list_checkpoints(run_dir)) or (log.is_file() and log.stat().st_size > 0)


def _ode_solver(args: argparse.Namespace, model):
    """The ODE solver for a CNF from --solver/--atol/--rtol/--steps; None for other models."""
    if hasattr(model, "eval_solver"):
        return _solver_from_args(args, model.eval_solver)
    given = [k for k in ("solver", "atol", "rtol", "steps") if getattr(args, k) is not None]
    if given:
        raise ConfigError(f"--{given[0]} applies to CNF models; {model.name} needs no ODE solver")
    return None


# -- commands ----------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from flowlab.train import distributed

    _set_threads(args.threads)
    ranks = distributed.init_from_env()  # under torchrun: join the process group
    try:
        return _train(args, ranks)
    finally:
        distributed.shutdown()


def _train(args: argparse.Namespace, ranks) -> int:
    import torch

    from flowlab import __version__
    from flowlab.eval import heldout_points
    from flowlab.models import build_model
    from flowlab.train import TrainConfig, train
    from flowlab.train.checkpoint import CONFIG, read_run_config

    say = print if ranks.is_main else (lambda *a, **k: None)
    if args.resume is not None and args.init is not None:
        raise ConfigError("--resume continues a run with its own weights; drop --init")
    if args.resume is not None:
        run_dir = args.resume
        config = read_run_config(run_dir)
        dataset = _data_from_config(config)
        train_options = config["train"]
        if args.iters is not None or args.seconds is not None:
            train_options = {**train_options, "iters": args.iters, "seconds": args.seconds}
        train_config = TrainConfig(**train_options)
        torch.manual_seed(train_config.seed)
        model = build_model(config["model"], **config["model_options"])
        resume = True
    else:
        dataset = _open_data(args)
        seconds = args.seconds
        if args.iters is None and seconds is None:
            seconds = DEFAULT_SECONDS
        train_config = TrainConfig(
            iters=args.iters, seconds=seconds, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, schedule=args.schedule, grad_clip=args.grad_clip,
            checkpoint_every=args.checkpoint_every, seed=args.seed, ema=args.ema,
            checkpoint_every_steps=args.checkpoint_every_steps,
            keep_checkpoints=args.keep_checkpoints, on_nonfinite=args.on_nonfinite,
            max_restores=args.max_restores,
            snapshot_at=tuple(args.snapshot_at), keep_best=args.keep_best,
            val_every=args.val_every,
        )
        torch.manual_seed(args.seed)
        shape = dataset.event_shape if _is_images(dataset) else (dataset.dim,)
        options = _model_options(args, shape)
        if args.reflow is not None:
            if args.model != "cfm" or args.init is not None:
                raise ConfigError("--reflow trains a cfm model from its teacher's weights: use "
                                  "--model cfm and no --init")
            if options.get("target") == "averaged":
                raise ConfigError("--reflow trains on the teacher's pairs as they are; the "
                                  "averaged target would replace them: drop --target averaged")
            options.update(sigma_min=0.0, coupling="independent")  # the pairs are the coupling
        source = args.reflow or args.init
        init = _init_weights(source, options, dataset.name) if source else None
        model = build_model(args.model, **options)
        if init is not None:
            _load_init(model, init, source)
        if _is_images(dataset) and dataset.dequantization == "variational":
            from flowlab.models import VariationalDequantization

            model = VariationalDequantization(model, levels=dataset.levels, alpha=dataset.alpha)
        run_dir = args.out or Path("runs") / f"{dataset.name}-{model.name}"
        if run_dir.exists() and any(run_dir.iterdir()) and not args.force:
            raise RunDirError(
                f"run folder {run_dir} already exists; choose another --out, continue it "
                f"with --resume {run_dir}, or replace it with --force"
            )
        ranks.barrier()  # every rank has checked before rank 0 writes
        if ranks.is_main:
            if run_dir.exists() and args.force:
                shutil.rmtree(run_dir)
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise RunDirError(f"cannot create the run folder {run_dir}: "
                                  f"{err.strerror or err}; choose another --out") from err
        config = {
            "flowlab_version": __version__, "dataset": dataset.name, "model": model.name,
            "model_options": model.config(), "train": train_config.to_dict(),
        }
        if _is_images(dataset):
            config["data"] = dataset.config()
        resume = False

    try:
        if not resume and ranks.is_main:
            if args.reflow is not None:
                config["reflow"] = _make_pairs(args.reflow, args.pairs, run_dir, args.seed,
                                               progress=not args.no_progress)
            _write_json(run_dir / CONFIG, config)
        ranks.barrier()
        if not resume and args.reflow is not None:
            config = read_run_config(run_dir)  # with the pairs' description
        workers = f", {ranks.world_size} processes" if ranks.active else ""
        if _is_images(dataset):
            sampler = dataset.sampler()
            val = dataset.validation_points(train_config.val_size)
            about = dataset.describe()
        else:
            sampler = (_pair_sampler(run_dir) if "reflow" in config
                       else lambda n, gen: dataset.sample(n, generator=gen))
            val = heldout_points(dataset, train_config.val_size,
                                 seed=10_000 + train_config.seed)
            about = f"{dataset.name} (true entropy H = {dataset.entropy:.4f} nats)"
        say(f"training {model.name} ({model.num_parameters():,} parameters) on {about} into "
            f"{run_dir}{workers}")
        result = train(
            model, sampler, train_config, run_dir,
            resume=resume, progress=not args.no_progress, val_points=val.float(),
        )
    except BaseException:
        if not resume and ranks.is_main and not _has_progress(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing half written is left
        raise
    if result.stopped_by != "budget":
        return 128 + int(getattr(signal.Signals, result.stopped_by))
    last = result.last_metrics
    objective = (f"last batch NLL {last['nll']:.4f} nats" if "nll" in last
                 else f"last batch loss {last.get('loss', float('nan')):.4f}")
    say(f"done: {result.steps} steps in {result.seconds:.1f} s of training; {objective}, "
        f"NFE {last.get('nfe_forward', 0):.0f}")
    if result.best is not None:
        say(f"model: the best validation weights, step {result.best['step']} at "
            f"{result.best['seconds']:.0f} s (validation NLL {result.best['val_nll']:.4f} nats)")
    say(f"next: flowlab eval {run_dir}  and  flowlab plot {run_dir}")
    return 0


def _load(run: Path):
    from flowlab.train import load_run

    model, config = load_run(run)
    return model, config, _data_from_config(config)


def cmd_eval(args: argparse.Namespace) -> int:
    from flowlab.train import distributed

    _set_threads(args.threads)
    ranks = distributed.init_from_env()  # under torchrun the test points are shared out
    try:
        return _eval(args, ranks)
    finally:
        distributed.shutdown()


def _eval(args: argparse.Namespace, ranks) -> int:
    import torch

    from flowlab.eval import evaluate_nll, heldout_points

    model, config, dataset = _load(args.run)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    model = model.to(dtype)
    solver = _ode_solver(args, model)
    if _is_images(dataset):
        return _eval_images(args, ranks, model, config, dataset, solver, dtype)
    if args.probes is not None:
        raise ConfigError("--probes applies to image runs (bits/dim); drop it for 2-D data")
    points = heldout_points(dataset, args.n_test or 20000).to(dtype)
    result = evaluate_nll(
        model, points, batch_size=args.batch_size, solver=solver, divergence=args.divergence,
        entropy=dataset.entropy, reference=dataset,
    )
    if not ranks.is_main:
        return 0
    report = {
        "dataset": dataset.name, "model": config["model"], **result.to_dict(),
        "dtype": args.dtype, "run": str(args.run), "processes": ranks.world_size,
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
    ]
    _print_rows(rows + _solve_rows(result, args.dtype))
    print(f"wrote {args.run / 'eval.json'}")
    return 0


def _solve_rows(result, dtype: str) -> list[tuple[str, str]]:
    """How an evaluation was computed: estimator, solver, NFE, time."""
    return [
        ("divergence", result.estimator),
        ("solver", f"{result.solver or 'none (closed-form change of variables)'}, {dtype}"),
        ("NFE per solve", f"{result.nfe:.0f}" if result.nfe is not None else "-"),
        ("seconds", f"{result.seconds:.1f} s"),
    ]


def _print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _eval_images(args, ranks, model, config, task, solver, dtype) -> int:
    """Test bits/dim of an image run, over the whole test split unless --n-test."""
    from flowlab.eval import evaluate_bits_per_dim, score_is_stochastic
    from flowlab.eval.bpd import STOCHASTIC_DEFAULT_PROBES

    if ranks.active:
        raise ConfigError("flowlab eval of image runs runs in one process; drop torchrun")
    stochastic = score_is_stochastic(model, task, args.divergence, solver)
    probes = args.probes or (STOCHASTIC_DEFAULT_PROBES if stochastic else 1)
    test = task.test_split()
    result = evaluate_bits_per_dim(model, task, test, n_test=args.n_test,
                                   batch_size=min(args.batch_size, 1000), solver=solver,
                                   divergence=args.divergence, probes=probes, dtype=dtype,
                                   progress=lambda line: print(line, flush=True))
    report = {"dataset": task.name, "model": config["model"], **result.to_dict(),
              "dtype": args.dtype, "run": str(args.run), "preprocess": repr(task.preprocess)}
    _write_json(args.run / "eval.json", report)
    subset = ("the whole test set" if result.n_test == result.n_total
              else f"a random subset of {result.n_test} of {result.n_total}")
    bound = ("variational dequantization: the variational bound, an upper bound on the "
             "discrete data's bits/dim that a trained q(u|x) makes tighter than uniform "
             "dequantization's" if result.dequantization == "variational"
             else "uniform dequantization: an upper bound on the discrete data's bits/dim")
    if not stochastic:
        noise = "0 (a deterministic score)"
    elif result.estimator_se is None:
        noise = "- (needs --probes 2 or more)"
    else:
        shown = (f"{result.estimator_se:.4f}" if result.estimator_se >= 5e-4
                 else f"{result.estimator_se:.2e}")
        noise = f"{shown} bits/dim (± 1 s.e. of the mean due to the draws alone)"
    draws = ("Hutchinson probes" if result.estimator == "hutchinson" else "")
    if result.dequantization == "variational":
        draws = " and ".join(d for d in (draws, "dequantization noise u ~ q(u|x)") if d)
    name = config["model"]
    if result.dequantization == "variational":
        name = f"{config['model_options']['inner']} ({name})"
    rows = [
        ("dataset", task.name), ("model", name),
        ("test bits/dim", f"{result.bits_per_dim:.4f} ± {result.bpd_se:.4f} (± 1 s.e. over "
                          f"images; {bound})"),
        ("test images", f"{result.n_test} ({subset})"),
        ("probes", f"{result.probes} per image" + (f" (independent {draws}, averaged)"
                                                   if stochastic else "")),
        ("estimator s.e.", noise),
    ]
    _print_rows(rows + _solve_rows(result, args.dtype))
    print(f"wrote {args.run / 'eval.json'}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from flowlab.eval.samples import BLOCKS, sample_quality

    if args.out is not None and args.out.suffix not in (".npy", ".csv", ".png"):
        raise ConfigError(f"unknown sample file type {args.out.suffix!r}; use .npy or .csv "
                          "(points), .png or .npy (images)")
    model, _, dataset = _load(args.run)
    images = _is_images(dataset)
    out = args.out or args.run / ("samples.png" if images else "samples.npy")
    allowed = (".png", ".npy") if images else (".npy", ".csv")
    if out.suffix not in allowed:
        raise ConfigError(f"this run models {'images' if images else '2-D points'}: write its "
                          f"samples to {' or '.join(allowed)}, not {out.suffix}")
    solver = _ode_solver(args, model)
    model.eval()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    # The noise of model.sample((num,)), so a seed gives the same samples as before.
    z = model.base_sample((args.num,))
    with torch.no_grad():
        if solver is not None:
            x, stats = model.to_data_with_stats(z, solver=solver)
        else:
            x, stats = model.to_data(z), []
    seconds = time.perf_counter() - start
    if images:
        from flowlab.viz import save_image_grid

        pixels = dataset.to_pixels(x)
        if out.suffix == ".png":
            save_image_grid(pixels, out, dataset.levels)
        else:
            np.save(out, pixels.cpu().numpy())
        print(f"wrote {args.num} sampled images to {out} in {seconds:.1f} s")
        return 0
    samples = x.cpu().numpy()
    if out.suffix == ".csv":
        np.savetxt(out, samples, delimiter=",")
    else:
        np.save(out, samples)
    how = (f"{solver.describe()}, NFE {sum(s.nfe_forward for s in stats)}"
           if solver is not None else f"one pass of {model.name}")
    print(f"wrote {args.num} samples to {out} in {seconds:.1f} s ({how})")
    if args.quality and getattr(dataset, "entropy", None) is not None:
        if args.num < 2 * BLOCKS:
            print(f"sample quality: skipped, it needs at least {2 * BLOCKS} samples")
        else:
            q = sample_quality(x, dataset)
            print(f"sample quality: cross-entropy {q.cross_entropy:.4f} ± "
                  f"{q.cross_entropy_se:.4f} nats under the true density (H = {q.entropy:.4f} "
                  f"nats), {100 * q.outside_fraction:.1f}% outside its support; MMD^2 "
                  f"{q.mmd2:.5f} ± {q.mmd2_se:.5f} to {q.n} fresh data points")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    import torch

    from flowlab import viz
    from flowlab.train.checkpoint import LOG

    _set_threads(args.threads)
    model, config, dataset = _load(args.run)
    model.eval()
    torch.manual_seed(args.seed)
    is_cnf = hasattr(model, "eval_solver")
    if _is_images(dataset):
        return _plot_images(args, model, config, dataset)
    plot_solver = model.eval_solver.replace(atol=1e-5, rtol=1e-5) if is_cnf else None
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
    if args.gif and is_cnf:
        written.append(viz.animate_flow(model, args.run / "flow.gif", bounds=dataset.bounds))
    elif args.gif:
        print(f"no flow animation: it shows a CNF's vector field, and {model.name} has none")
    print(f"model density integrates to {info['model_mass']:.4f} on the plot grid")
    for path in written:
        print(f"wrote {path}")
    return 0


def _plot_images(args, model, config, task) -> int:
    """Sampled images next to validation images, the training curves, interpolations between
    test images in the base space, and for a CNF the GIF of test images carried to noise and
    integrated back, with the vector field."""
    import torch

    from flowlab import viz
    from flowlab.train.checkpoint import LOG

    # A CNF: a looser solve than eval's is plenty for a picture.
    solver = (model.eval_solver.replace(atol=1e-5, rtol=1e-5)
              if hasattr(model, "eval_solver") else None)
    with torch.no_grad():
        if solver is not None:
            samples = model.to_data(model.base_sample((64,)), solver=solver)
        else:
            samples = model.sample((64,))
    written = [viz.save_image_grid(task.to_pixels(samples), args.run / "samples.png",
                                   task.levels),
               viz.save_image_grid(task.valid.images[:64], args.run / "data.png", task.levels)]
    log_path = args.run / LOG
    if log_path.is_file():
        records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        written.append(viz.plot_training_curves(records, args.run / "training.png"))

    test = task.test_split()
    first, second = viz.choose_pairs(test.labels, 8, args.seed)
    print(f"interpolations: {len(first)} pairs of test images (different labels), slerp in "
          "the base space, 10 steps ...", flush=True)
    start = time.perf_counter()
    written.append(viz.interpolate_images(
        model, task, test.images[first], test.images[second], 10,
        args.run / "interpolations.png", solver=solver, seed=args.seed).path)
    print(f"interpolations: done in {time.perf_counter() - start:.1f} s", flush=True)
    if args.gif and viz.has_vector_field(model):
        chosen = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))
        pixels = test.images[chosen[:16]]
        blocks = len(getattr(model, "blocks", ())) or 1
        start = time.perf_counter()
        result = viz.animate_images(
            model, task, pixels, args.run / "flow.gif", max(2, 24 // blocks), solver=solver,
            seed=args.seed, progress=lambda line: print(line + " ...", flush=True))
        print(f"flow GIF: {result.num_frames} frames in {time.perf_counter() - start:.1f} s; "
              f"round trip data -> noise -> data of {pixels.shape[0]} test images: max "
              f"|x - x'| = {result.max_error:.2g} (model space), {result.pixels_changed} of "
              f"{pixels.numel()} pixel values changed")
        written.append(result.path)
    elif args.gif:
        print(f"no flow.gif: it shows a CNF's vector field, and {model.name} has none")
    for path in written:
        print(f"wrote {path}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "plot": cmd_plot}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"flowlab: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():  # restores showwarning afterwards
            warnings.showwarning = _show_warning
            return COMMANDS[args.command](args)
    except FlowlabError as err:
        print(f"flowlab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
