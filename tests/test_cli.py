"""The ``infl`` command: argument errors are one line with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
        (["benchmark", "--bad-arg"], "unrecognized arguments: --bad-arg"),
        (["benchmark", "--quick", "--full"], "not allowed with argument"),
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
        (["benchmark", "--models", "resnet"], "--models takes logreg and/or mlp"),
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


def test_correct_writes_its_figure_and_says_where(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(Path(__file__).parent / "studies"))
    from test_over_time import CORRECTION_ROWS, stored_correction

    from infl.studies.over_time import CorrectionSettings

    stored_correction(tmp_path, CorrectionSettings(k=10, lr=0.02, max_steps=50), CORRECTION_ROWS)
    assert main(["correct", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path}/figures/correction.png" in out
    assert (tmp_path / "figures" / "correction.png").stat().st_size > 0
    assert (
        "![success rate and median steps per ranking]" in (tmp_path / "correction.md").read_text()
    )


def test_correct_no_figures_skips_the_png(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parent / "studies"))
    from test_over_time import CORRECTION_ROWS, stored_correction

    from infl.studies.over_time import CorrectionSettings

    stored_correction(tmp_path, CorrectionSettings(k=10, lr=0.02, max_steps=50), CORRECTION_ROWS)
    assert main(["correct", "--out", str(tmp_path), "--no-figures", "--no-progress"]) == 0
    assert "correction.png" not in capsys.readouterr().out
    assert not (tmp_path / "figures").exists()


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("x = 1\n", "defines no setup()"),
        ("def setup():\n    raise ValueError('no data here')\n", "raised ValueError"),
        ("def setup():\n    return 1, 2\n", "must return (model, objective"),
    ],
)
def test_audit_spec_errors_are_one_line_and_exit_1(tmp_path, capsys, source, words):
    spec = tmp_path / "my_setup.py"
    spec.write_text(source)
    assert main(["audit", "--spec", str(spec), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert words in err
    assert not (tmp_path / "out").exists()


def test_audit_test_indices_must_be_integers(tmp_path, capsys):
    spec = tmp_path / "my_setup.py"
    spec.write_text("x = 1\n")
    args = ["audit", "--spec", str(spec), "--out", str(tmp_path / "out")]
    assert main([*args, "--test-indices", "3,x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "--test-indices takes comma-separated integers" in err
