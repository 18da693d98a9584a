"""Malformed inputs to the loaders, the CLI and the Python API end in flowlab's own clear error.

Two parts: a catalogue of distinct bad inputs, each with the words its message must contain,
and property-based tests (hypothesis) that throw arbitrary bytes, JSON, text, shapes and
option values at the same entry points: whatever comes in, the outcome is either success or
a FlowlabError (for the CLI: exit code 2 and one ``error:`` line), never a bare traceback
from deep inside.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from flowlab.cli import build_parser, main
from flowlab.data import get_dataset
from flowlab.errors import ConfigError, DataError, FlowlabError, RunDirError
from flowlab.eval import evaluate_nll
from flowlab.eval.samples import mmd2
from flowlab.fm.coupling import OTCoupling
from flowlab.models import FFJORD, build_model
from flowlab.ode import SolverConfig
from flowlab.train import TrainConfig, load_model, load_run, save_model, train
from flowlab.train import checkpoint as ckpt

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def tiny() -> FFJORD:
    return FFJORD(2, hidden=(4,), solver=SolverConfig("rk4", steps=1))


def moons(n, gen):
    return get_dataset("moons").sample(n, generator=gen)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A small finished run folder that the cases below damage copies of."""
    run = tmp_path_factory.mktemp("run")
    assert main(["train", "--data", "moons", "--iters", "2", "--hidden", "4", "--solver",
                 "rk4", "--steps", "1", "--no-progress", "--out", str(run / "r")]) == 0
    return run / "r"


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


# -- the catalogue: (name, error type, words in the message, action) ----------------------------
def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _model_file_with_metadata(tmp: Path, meta: dict) -> Path:
    blob = st_save({"model.x": torch.zeros(1)}, metadata={"flowlab": json.dumps(meta)})
    return _write(tmp / "m.safetensors", blob)


API_CASES = [
    ("unknown dataset", DataError, "unknown toy dataset",
     lambda tmp: get_dataset("mnist-of-course")),
    ("unknown model", ConfigError, "unknown model", lambda tmp: build_model("glow9000")),
    ("log_prob of a list", DataError, "torch.Tensor", lambda tmp: tiny().log_prob([[0.0, 1.0]])),
    ("log_prob wrong dimension", DataError, "shape",
     lambda tmp: tiny().log_prob(torch.zeros(3, 5))),
    ("log_prob missing batch axis", DataError, "shape",
     lambda tmp: tiny().log_prob(torch.zeros(2))),
    ("log_prob integer points", DataError, "floating-point",
     lambda tmp: tiny().log_prob(torch.zeros(3, 2, dtype=torch.int64))),
    ("log_prob NaN point", DataError, "NaN",
     lambda tmp: tiny().log_prob(torch.tensor([[0.0, float("nan")]]))),
    ("log_prob Inf point", DataError, "Inf",
     lambda tmp: tiny().log_prob(torch.tensor([[float("inf"), 0.0]]))),
    ("FFJORD zero blocks", ConfigError, "num_blocks", lambda tmp: FFJORD(2, num_blocks=0)),
    ("FFJORD unknown divergence", ConfigError, "divergence",
     lambda tmp: FFJORD(2, divergence="guess")),
    ("FFJORD negative regularizer", ConfigError, "kinetic", lambda tmp: FFJORD(2, kinetic=-1.0)),
    ("FFJORD unknown activation", ConfigError, "activation",
     lambda tmp: FFJORD(2, activation="sigmoidish")),
    ("FFJORD zero dimension", ConfigError, "dim", lambda tmp: FFJORD(0)),
    ("FFJORD negative width", ConfigError, "hidden", lambda tmp: FFJORD(2, hidden=(8, -3))),
    ("FFJORD non-positive T", ConfigError, "T", lambda tmp: FFJORD(2, T=0.0)),
    ("unknown solver", ConfigError, "solver", lambda tmp: SolverConfig("rk45-magic")),
    ("negative tolerance", ConfigError, "atol", lambda tmp: SolverConfig(atol=-1e-5)),
    ("fixed solver zero steps", ConfigError, "steps", lambda tmp: SolverConfig("rk4", steps=0)),
    ("cfm unknown path", ConfigError, "path", lambda tmp: build_model("cfm", dim=2, path="zigzag")),
    ("cfm negative sigma_min", ConfigError, "sigma_min",
     lambda tmp: build_model("cfm", dim=2, sigma_min=-0.1)),
    ("cfm unknown coupling", ConfigError, "coupling",
     lambda tmp: build_model("cfm", dim=2, coupling="greedy")),
    ("OT coupling zero block", ConfigError, "block", lambda tmp: OTCoupling(block_size=0)),
    ("train without budget", ConfigError, "budget", lambda tmp: TrainConfig()),
    ("train NaN learning rate", ConfigError, "lr", lambda tmp: TrainConfig(iters=1, lr=math.nan)),
    ("train unknown fault policy", ConfigError, "on_nonfinite",
     lambda tmp: TrainConfig(iters=1, on_nonfinite="ignore")),
    ("train on an empty data set", DataError, "empty",
     lambda tmp: train(tiny(), lambda n, g: torch.empty(0, 2), TrainConfig(iters=1),
                       progress=False)),
    ("train on 3-D points for a 2-D model", DataError, "shape",
     lambda tmp: train(tiny(), lambda n, g: torch.zeros(n, 3), TrainConfig(iters=1),
                       progress=False)),
    ("train on NaN data", DataError, "NaN",
     lambda tmp: train(tiny(), lambda n, g: torch.full((n, 2), math.nan), TrainConfig(iters=1),
                       progress=False)),
    ("evaluate on zero points", FlowlabError, "point",
     lambda tmp: evaluate_nll(tiny(), torch.zeros(0, 2))),
    ("MMD of mismatched dimensions", DataError, "dimension",
     lambda tmp: mmd2(torch.zeros(10, 2), torch.zeros(10, 3))),
    ("model file missing", RunDirError, "not found",
     lambda tmp: load_model(tmp / "nothing.safetensors")),
    ("model file of random bytes", RunDirError, "corrupt",
     lambda tmp: load_model(_write(tmp / "m.safetensors", b"\x13\x00" * 300))),
    ("model file truncated", RunDirError, "corrupt",
     lambda tmp: load_model(_write(tmp / "m.safetensors",
                                   _saved_model_bytes(tmp)[:77]))),
    ("model file from another format version", RunDirError, "incompatible",
     lambda tmp: load_model(_model_file_with_metadata(tmp, {"format_version": 99}))),
    ("model file without a model name", RunDirError, "not a flowlab model",
     lambda tmp: load_model(_model_file_with_metadata(tmp, {"format_version": 1}))),
    ("model file whose weights do not fit", RunDirError, "do not fit",
     lambda tmp: load_model(_model_file_with_metadata(
         tmp, {"format_version": 1, "model": "ffjord", "model_options": {"dim": 2}}))),
    ("run folder missing", RunDirError, "does not exist", lambda tmp: load_run(tmp / "nope")),
    ("run folder without config", RunDirError, "config.json", lambda tmp: load_run(tmp)),
    ("run config not JSON", RunDirError, "not valid JSON",
     lambda tmp: (_write(tmp / "config.json", b"{model: ffjord"), load_run(tmp))),
    ("run config a JSON list", RunDirError, "not a flowlab run configuration",
     lambda tmp: (_write(tmp / "config.json", b"[1, 2]"), load_run(tmp))),
    ("conditional flow without context", DataError, "context",
     lambda tmp: _conditional().log_prob(torch.zeros(4, 2))),
    ("context of the wrong width", DataError, "context must have shape",
     lambda tmp: _conditional().log_prob(torch.zeros(4, 2), torch.zeros(4, 3))),
    ("context with other rows than the batch", DataError, "rows",
     lambda tmp: _conditional().log_prob(torch.zeros(4, 2), torch.zeros(5, 2))),
    ("context with NaN", DataError, "NaN",
     lambda tmp: _conditional().log_prob(torch.zeros(4, 2), torch.full((4, 2), math.nan))),
    ("context for an unconditional flow", DataError, "not conditional",
     lambda tmp: build_model("realnvp", dim=2).log_prob(torch.zeros(4, 2), torch.zeros(4, 2))),
    ("flow with an unknown option", ConfigError, "unexpected keyword",
     lambda tmp: build_model("maf", dim=2, bins=8)),
    ("flow with dim and image shape", ConfigError, "dim",
     lambda tmp: build_model("glow", dim=2, image_shape=[1, 4, 4])),
    ("image flow on odd sides", ConfigError, "divisible",
     lambda tmp: build_model("glow", image_shape=[1, 5, 4])),
    ("spline with zero bins", ConfigError, "bins",
     lambda tmp: build_model("nsf-coupling", dim=2, bins=0)),
    ("resume without checkpoints", RunDirError, "no checkpoint",
     lambda tmp: train(tiny(), moons, TrainConfig(iters=1), tmp, resume=True, progress=False)),
]


def _conditional():
    return build_model("realnvp", dim=2, context_dim=2, num_blocks=2, hidden=[8])


def _saved_model_bytes(tmp: Path) -> bytes:
    save_model(tmp / "good.safetensors", tiny())
    return (tmp / "good.safetensors").read_bytes()


@pytest.mark.parametrize("name, error, words, action", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_and_loader_cases(tmp_path, name, error, words, action):
    with pytest.raises(error) as info:
        action(tmp_path)
    assert words.lower() in str(info.value).lower(), str(info.value)


CLI_CASES = [
    ("unknown dataset", ["train", "--data", "cifar", "--iters", "1"], "unknown toy dataset"),
    ("unknown model", ["train", "--model", "vae", "--iters", "1"], "unknown model"),
    ("text batch size", ["train", "--batch-size", "many"], "expected an integer"),
    ("zero batch size", ["train", "--batch-size", "0"], ">= 1"),
    ("negative learning rate", ["train", "--lr", "-0.1"], "> 0"),
    ("NaN learning rate", ["train", "--lr", "nan"], "finite"),
    ("infinite seconds", ["train", "--seconds", "inf"], "finite"),
    ("bad hidden widths", ["train", "--hidden", "64,-3"], "positive widths"),
    ("bad snapshot times", ["train", "--snapshot-at", "ten"], "positive seconds"),
    ("EMA decay of 1", ["train", "--ema", "1", "--iters", "1"], "ema"),
    ("unknown solver", ["train", "--solver", "rk45"], "invalid choice"),
    ("unknown fault policy", ["train", "--on-nonfinite", "ignore"], "invalid choice"),
    ("seminorm without adjoint", ["train", "--seminorm", "--iters", "1"], "--adjoint"),
    ("resume of a missing folder", ["train", "--resume", "/nonexistent/run"], "does not exist"),
    ("init from a missing folder", ["train", "--init", "/nonexistent/run", "--iters", "1"],
     "does not exist"),
    ("eval of a missing folder", ["eval", "/nonexistent/run"], "does not exist"),
    ("eval of zero points", ["eval", "/nonexistent/run", "--n-test", "0"], ">= 1"),
    ("sample to an unknown file type", ["sample", "/nonexistent/run", "--out", "x.txt"],
     ".npy"),
    ("plot of a missing folder", ["plot", "/nonexistent/run"], "does not exist"),
    ("no command", [], "required"),
]


@pytest.mark.parametrize("name, argv, words", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_cases(capsys, tmp_path, monkeypatch, name, argv, words):
    monkeypatch.chdir(tmp_path)  # a default run folder would land here
    code = _exit_code(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error:" in err and "Traceback" not in err
    assert words.lower() in err.lower(), err
    assert not (tmp_path / "runs").exists()  # nothing half written


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's own errors
        return int(exit_.code)


def test_cli_existing_run_folder_is_not_overwritten(capsys, run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    before = sorted(p.name for p in run.iterdir())
    assert _exit_code(["train", "--data", "moons", "--iters", "1", "--out", str(run)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before


def test_cli_failed_setup_leaves_no_run_folder(capsys, tmp_path):
    """--reflow from a folder that is not a trained run fails after the run folder is made:
    the folder is removed again."""
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps(
        {"dataset": "moons", "model": "cfm", "model_options": {"dim": 2}, "train": {}}))
    out = tmp_path / "student"
    code = _exit_code(["train", "--data", "moons", "--model", "cfm", "--reflow", str(teacher),
                       "--iters", "1", "--out", str(out), "--no-progress"])
    assert code == 2 and "error:" in capsys.readouterr().err
    assert not out.exists()


def test_damaged_run_folders_get_clear_errors(capsys, run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    (run / ckpt.WEIGHTS).write_bytes(b"garbage")
    assert _exit_code(["eval", str(run), "--n-test", "10"]) == 2
    assert "corrupt" in capsys.readouterr().err
    (run / ckpt.WEIGHTS).unlink()
    assert _exit_code(["sample", str(run), "-n", "5"]) == 2
    assert "--resume" in capsys.readouterr().err  # says how to get a model file


# -- property-based: arbitrary input, clear error or success --------------------------------------
@SETTINGS
@given(data=st.binary(max_size=600))
def test_any_bytes_as_a_model_file(tmp_path, data):
    path = tmp_path / "any.safetensors"
    path.write_bytes(data)
    with pytest.raises(RunDirError):
        load_model(path)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)


@SETTINGS
@given(meta=JSON)
def test_any_metadata_in_a_model_file(tmp_path, meta):
    try:
        load_model(_model_file_with_metadata(tmp_path, meta))
    except FlowlabError:
        return
    pytest.fail(f"metadata {meta!r} was accepted")


@SETTINGS
@given(config=JSON, extra=st.dictionaries(
    st.sampled_from(["dataset", "model", "model_options", "train"]), JSON, max_size=4))
def test_any_run_config(tmp_path, config, extra):
    if isinstance(config, dict):
        config = {**config, **extra}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FlowlabError):
        load_run(tmp_path)  # there is no model file either way: an error, but a clear one


NUMERIC_OPTIONS = ["--lr", "--batch-size", "--iters", "--seconds", "--hidden", "--snapshot-at",
                   "--ema", "--sigma-min", "--ot-block", "--T", "--kinetic", "--max-restores",
                   "--checkpoint-every", "--keep-checkpoints", "--atol", "--steps"]


@SETTINGS
@given(option=st.sampled_from(NUMERIC_OPTIONS),
       value=st.text(st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=10))
def test_any_text_for_a_numeric_option(option, value):
    parser = build_parser()
    try:
        parser.parse_args(["train", f"{option}={value}"])
    except SystemExit as exit_:
        assert exit_.code == 2


@SETTINGS
@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.int32, torch.bool]),
       fill=st.sampled_from([0.5, math.nan, math.inf, -math.inf]))
def test_any_tensor_to_log_prob(shape, dtype, fill):
    model = tiny()
    x = torch.full(shape, fill).to(dtype) if dtype.is_floating_point else torch.zeros(
        shape, dtype=dtype)
    valid = (len(shape) == 2 and shape[1] == 2 and dtype.is_floating_point
             and (math.isfinite(fill) or shape[0] == 0))
    if valid:
        assert model.log_prob(x).shape == (shape[0],)
    else:
        with pytest.raises(DataError):
            model.log_prob(x)


@SETTINGS
@given(options=st.fixed_dictionaries({}, optional={
    "hidden": st.lists(st.integers(-2, 3), max_size=2),
    "num_blocks": st.integers(-1, 2),
    "T": st.floats(-1, 1) | st.just(math.nan),
    "kinetic": st.floats(-1, 1),
    "divergence": st.sampled_from(["exact", "hutchinson", "oops"]),
    "layer": st.sampled_from(["concatsquash", "concat", "nope"]),
}))
def test_any_ffjord_options(options):
    try:
        model = FFJORD(2, solver=SolverConfig("rk4", steps=1), **options)
    except ConfigError:
        return
    assert model.log_prob(torch.zeros(2, 2)).shape == (2,)


@SETTINGS
@given(options=st.fixed_dictionaries({}, optional={
    "iters": st.integers(-2, 3) | st.none(),
    "seconds": st.floats(allow_nan=True) | st.none(),
    "batch_size": st.integers(-1, 4),
    "lr": st.floats(allow_nan=True, allow_infinity=True),
    "ema": st.floats(-1, 2),
    "keep_checkpoints": st.integers(-1, 2),
    "checkpoint_every_steps": st.integers(-1, 2) | st.none(),
}))
def test_any_train_config(options):
    try:
        TrainConfig(**options)
    except ConfigError:
        pass


@SETTINGS
@given(data=st.binary(max_size=400), gz=st.booleans())
def test_any_bytes_as_an_idx_file(tmp_path, data, gz):
    import gzip

    from flowlab.data import read_idx

    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(gzip.compress(data) if gz else data)
    try:
        read_idx(path)  # a few byte strings are valid IDX files (e.g. a 0-d ubyte header)
    except DataError as err:
        assert str(path) in str(err)


@SETTINGS
@given(data=st.binary(max_size=400))
def test_any_bytes_as_a_cifar_batch(tmp_path, data):
    from flowlab.data import load_cifar10

    folder = tmp_path / "cifar"
    folder.mkdir(exist_ok=True)
    (folder / "test_batch").write_bytes(data)
    with pytest.raises(DataError, match="test_batch"):
        load_cifar10(folder, split="test")
