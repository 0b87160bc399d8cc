"""The ``infl`` command: argument errors are one line with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from infl.cli import main


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        ([], "arguments are required: COMMAND"),
        (["fragility", "--bogus"], "unrecognized arguments: --bogus"),
        (["fragility", "--workers", "0"], "expected a positive integer, got '0'"),
        (["fragility", "--quick", "--full"], "not allowed with argument"),
        (["fragility", "--dataset", "svhn"], "invalid choice: 'svhn'"),
        (["fading", "--horizons", "100,10"], "strictly increasing"),
        (["fading", "--horizons", "ten"], "comma-separated step counts"),
        (["correct", "--k", "-3"], "expected a positive integer"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("infl: error:")
    assert words in err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["fragility", "--dataset", "mnist"], "--dataset mnist needs --data-dir"),
        (["fragility", "--data-dir", "/nonexistent"], "--data-dir needs --dataset"),
        (["fragility", "--parts", "iris,imagenet"], "--parts takes iris and/or cnn"),
        (["fading", "--models", "gpt"], "--models takes iris and/or digits"),
        (["correct", "--lr", "-1"], "--lr must be positive"),
    ],
)
def test_inconsistent_arguments_exit_1_with_one_line(argv, words, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert words in err


def test_missing_mnist_files_are_reported_in_one_line(tmp_path, capsys):
    code = main(
        [
            "fragility",
            "--parts",
            "cnn",
            "--dataset",
            "mnist",
            "--data-dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "train-images-idx3-ubyte" in err


def test_python_dash_m_infl_runs_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "infl", "--version"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("infl ")
