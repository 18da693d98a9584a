"""The image benchmark's commands and report (no training: the cells are written by hand)."""

import argparse
from pathlib import Path

import pytest
from benchload import load_benchmark

im = load_benchmark("images.py", "images_benchmark_under_test")


def _args(**changes) -> argparse.Namespace:
    values = {"data": "mnist", "data_dir": Path("data/mnist"), "seconds": 60.0, "n_test": None,
              "probes": None, "train_args": None, "eval_args": None, "no_keep_best": False,
              "no_train": False}
    return argparse.Namespace(**{**values, **changes})


def _value(argv: list[str], option: str) -> str:
    """The value argparse keeps for ``option``: its last occurrence."""
    return argv[len(argv) - 1 - argv[::-1].index(option) + 1]


def test_train_args_come_after_the_method_options_and_win():
    argv = im.train_options("glow", _args(train_args="--batch-size 64 --lr 1e-3"),
                            Path("run"), 1)
    assert argv[:5] == ["train", "--data", "mnist", "--data-dir", "data/mnist"]
    assert "--keep-best" in argv and _value(argv, "--batch-size") == "64"
    assert _value(argv, "--lr") == "1e-3" and _value(argv, "--seconds") == "60.0"
    plain = im.train_options("cfm-unet", _args(), Path("run"), 2)
    assert "--batch-size" not in plain and _value(plain, "--threads") == "2"
    assert _value(plain, "--val-every") == "40"  # the common model selection


def test_discrete_flows_validate_often_on_digits_only():
    argv = im.train_options("maf", _args(data="digits", data_dir=None), Path("run"), 1)
    assert "--keep-best" in argv and _value(argv, "--val-every") == "400"
    assert _value(im.train_options("glow", _args(data="digits", data_dir=None,
                                                 train_args="--val-every 7"), Path("run"), 1),
                  "--val-every") == "7"  # --train-args still win
    assert _value(im.train_options("glow", _args(), Path("run"), 1), "--val-every") == "40"
    assert _value(im.train_options("cfm-unet", _args(data="digits", data_dir=None),
                                   Path("run"), 1), "--val-every") == "40"


def test_no_keep_best_drops_the_model_selection():
    argv = im.train_options("cfm-unet", _args(no_keep_best=True,
                                              train_args="--val-every 0"), Path("run"), 1)
    assert "--keep-best" not in argv and _value(argv, "--val-every") == "0"


def test_cell_commands_train_evaluate_measure_and_plot(tmp_path):
    steps = im.cell_commands("cfm-unet", _args(n_test=64, eval_args="--divergence hutchinson "
                                               "--probes 2"), tmp_path, 1)
    assert [s[3] if s[1] == "-m" else s[2] for s in steps] == [
        "train", "eval", "--measure", "plot"]
    evaluate = steps[1]
    assert _value(evaluate, "--n-test") == "64" and _value(evaluate, "--probes") == "2"
    assert _value(evaluate, "--divergence") == "hutchinson"
    assert steps[3][3:] == ["plot", str(tmp_path / im.RUN), "--threads", "1"]


def test_no_train_evaluates_the_existing_run_and_keeps_its_command(tmp_path):
    steps = im.cell_commands("glow", _args(no_train=True), tmp_path, 1)
    assert [s[3] if s[1] == "-m" else s[2] for s in steps] == ["eval", "--measure", "plot"]
    with pytest.raises(SystemExit, match="no trained model"):
        im.earlier_training(tmp_path)
    (tmp_path / im.RUN).mkdir()
    (tmp_path / im.RUN / "model.safetensors").write_bytes(b"")
    (tmp_path / im.OUTPUT).write_text("$ /x/python -m flowlab.cli train --data mnist --lr 1\n"
                                      "done\n$ /x/python -m flowlab.cli eval run\n")
    assert im.earlier_training(tmp_path) == "flowlab train --data mnist --lr 1"
    assert (tmp_path / im.TRAIN_OUTPUT).is_file() and not (tmp_path / im.OUTPUT).exists()
    assert im.earlier_training(tmp_path) == "flowlab train --data mnist --lr 1"  # again


def _cell(method: str, bpd: float, **extra) -> dict:
    return {"method": method, "dataset": "digits", "budget": 60.0, "machine": "test box",
            "threads": 1, "error": None, "bits_per_dim": bpd, "bpd_se": 0.01, "n_test": 297,
            "n_total": 297, "nfe": None, "estimator": "closed form", "eval_seconds": 1.0,
            "parameters": 1000, "train_steps": 10, "train_seconds": 60.0, "best": None,
            "sample_seconds": 0.1, "curve": [(10.0, bpd + 0.1), (60.0, bpd)],
            "task": "digits", **extra}


def test_report_lists_each_command_and_the_pictures_that_exist(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    cells = {"maf": _cell("maf", 2.5, train_command="flowlab train --model maf"),
             "cfm-unet": _cell("cfm-unet", 2.0, train_command="flowlab train --model cfm",
                               eval_args="--probes 2", nfe=80.0, estimator="hutchinson",
                               estimator_se=0.003, probes=2)}
    gif = runs / "cfm-unet" / im.RUN / "flow.gif"
    gif.parent.mkdir(parents=True)
    gif.write_bytes(b"GIF89a")
    text = im.write_results(cells, "digits", runs, results, "python benchmarks/images.py")
    assert "- maf: `flowlab train --model maf`" in text
    assert "- cfm-unet: `flowlab train --model cfm`, evaluated with `--probes 2`" in text
    assert (results / "images_digits_flow_cfm-unet.gif").read_bytes() == b"GIF89a"
    assert "images_digits_flow_cfm-unet.gif" in text
    assert "interpolations maf" not in text  # no picture, no link
    assert "`cfm-unet` (2.0000) beats the best discrete baseline `maf`" in text


def test_report_names_each_models_layout_once_not_the_first_cells():
    task = "digits (1,350 training images of 1x8x8, 17 levels, uniform dequantization, {} layout)"
    cells = {"maf": _cell("maf", 2.5, task=task.format("flat")),
             "glow": _cell("glow", 2.1, task=task.format("image")),
             "cfm-unet": _cell("cfm-unet", 1.9, task=task.format("image"))}
    text = im.report(cells, "digits", "python benchmarks/images.py", None)
    assert ("Data: digits (1,350 training images of 1x8x8, 17 levels, uniform "
            "dequantization).") in text
    assert ("Layout: as flattened pixel vectors: maf; as images (C, H, W): cfm-unet, glow."
            in text)


def test_verdict_says_when_the_test_images_differ():
    same = {"glow": _cell("glow", 1.60), "cfm-unet": _cell("cfm-unet", 1.38)}
    assert "the images are the same" in im.verdict(same)
    subset = {"glow": _cell("glow", 1.60, n_test=10_000, n_total=10_000),
              "cfm-unet": _cell("cfm-unet", 1.38, n_test=128, n_total=10_000)}
    text = im.verdict(subset)
    assert "scored on different test images, 128 and 10,000: not a paired comparison" in text
    assert "the images are the same" not in text


def test_merge_keeps_the_published_cells_and_replaces_rerun_ones(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    with pytest.raises(SystemExit) as refused:  # nothing published to merge into
        im.main(["--data", "digits", "--table-only", "--merge", "--runs", str(runs),
                 "--results", str(results)])
    assert refused.value.code == 2
    published = {"glow": _cell("glow", 2.1, train_command="flowlab train --model glow"),
                 "maf": _cell("maf", 2.3, train_command="flowlab train --model maf")}
    im.write_results(published, "digits", runs, results, "python benchmarks/images.py")
    rerun = runs / "maf" / im.CELL
    rerun.parent.mkdir(parents=True)
    rerun.write_text(im.json.dumps(_cell("maf", 2.2, train_command="flowlab train --new")))
    im.main(["--data", "digits", "--table-only", "--merge", "--runs", str(runs),
             "--results", str(results)])
    merged = im.json.loads((results / "images_digits.json").read_text())
    assert {c["method"]: c["bits_per_dim"] for c in merged["cells"]} == {"glow": 2.1, "maf": 2.2}
    assert merged["command"].startswith("python benchmarks/images.py; then python "
                                        "benchmarks/images.py --data digits --merge")
    text = (results / "images_digits.md").read_text()
    assert "flowlab train --new" in text and "flowlab train --model glow" in text
