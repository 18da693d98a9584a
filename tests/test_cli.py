"""End-to-end runs of the `flowlab` command line, and its errors on bad input."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from flowlab.cli import main

SMALL = ["--hidden", "32,32", "--batch-size", "256", "--lr", "5e-3", "--no-progress",
         "--atol", "1e-4", "--rtol", "1e-4"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "g8"
    code = main(["train", "--data", "8gaussians", "--iters", "250", "--out", str(run), *SMALL])
    assert code == 0
    return run


def test_train_eval_lowers_nll_far_below_single_gaussian_fit(trained_run, capsys):
    assert main(["eval", str(trained_run), "--n-test", "3000"]) == 0
    report = json.loads((trained_run / "eval.json").read_text())
    for key in ("dataset", "model", "nll_nats", "nll_se", "entropy_nats", "gap_nats", "nfe",
                "seconds", "n_test"):
        assert key in report, key
    assert report["dataset"] == "8gaussians" and report["model"] == "ffjord"
    assert report["n_test"] == 3000
    # The best single Gaussian: the mixture's covariance is 4.125 I (centres at radius
    # 4/1.414, std 0.5/1.414), entropy log(2 pi e) + log(4.125) = 4.255 nats.
    gaussian_fit = math.log(2 * math.pi * math.e) + math.log(16 / 1.414**2 / 2 + 0.125)
    assert report["nll_nats"] < gaussian_fit - 0.6, report
    # and never below the true entropy by more than 3 standard errors
    assert report["nll_nats"] > report["entropy_nats"] - 3 * report["nll_se"]
    out = capsys.readouterr().out
    assert "test NLL" in out and "nats" in out and "true entropy" in out


def test_plot_and_sample_write_files(trained_run, capsys):
    assert main(["plot", str(trained_run), "--resolution", "40"]) == 0
    for name in ("density.png", "samples.png", "training.png"):
        with Image.open(trained_run / name) as image:
            assert image.format == "PNG"
    with Image.open(trained_run / "flow.gif") as gif:
        assert gif.n_frames > 10
    out_file = trained_run / "s.npy"
    assert main(["sample", str(trained_run), "-n", "300", "--out", str(out_file)]) == 0
    samples = np.load(out_file)
    assert samples.shape == (300, 2) and np.isfinite(samples).all()


def test_resume_continues_a_run(trained_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    assert main(["train", "--resume", str(run), "--iters", "260", "--no-progress"]) == 0
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 260


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "nope", "--iters", "1"], "dataset 'nope'"),
        (["train", "--model", "nope", "--iters", "1"], "unknown model"),
        (["eval", "does/not/exist"], "does not exist"),
        (["plot", "does/not/exist"], "does not exist"),
        (["train", "--resume", "does/not/exist"], "does not exist"),
    ],
)
def test_bad_input_gives_one_line_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowlab: error:") and message in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # nothing half written


@pytest.mark.parametrize(
    "argv",
    [["train", "--hidden", "64,x"], ["train", "--seconds", "-3"], ["train", "--iters", "0"],
     ["train", "--solver", "rk45"], ["eval"], ["train", "--lr", "inf"]],
)
def test_malformed_options_exit_nonzero_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_existing_run_folder_is_not_overwritten(trained_run, capsys):
    before = (trained_run / "config.json").read_text()
    assert main(["train", "--iters", "1", "--out", str(trained_run)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (trained_run / "config.json").read_text() == before


def test_corrupt_run_folder_gets_clear_error(trained_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "corrupt"
    shutil.copytree(trained_run, run)
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[:100])
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "corrupt" in err
    (run / "config.json").write_text("{not json")
    assert main(["eval", str(run)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for option in ("--hidden", "--solver", "--atol", "--rtol", "--divergence", "--adjoint",
                   "--kinetic", "--jacobian", "--seconds", "--iters", "--seed"):
        assert option in text, option


def test_flow_matching_model_trains_and_evaluates_exactly(tmp_path, capsys):
    run = tmp_path / "cfm"
    assert main(["train", "--model", "cfm", "--coupling", "ot", "--data", "moons", "--iters",
                 "1000", "--batch-size", "256", "--out", str(run), "--hidden", "32,32",
                 "--no-progress"]) == 0
    assert main(["eval", str(run), "--n-test", "2000", "--atol", "1e-5", "--rtol", "1e-5"]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["model"] == "cfm" and report["estimator"] == "exact"
    # The best single Gaussian for moons is 0.90 nats from the truth (entropy of the fitted
    # covariance, 3.293, minus H); the flow, by an exact ODE likelihood, is well below that.
    assert -3 * report["kl_se"] < report["kl_nats"] < 0.75
