"""Retraining stores are keyed by the *content* of the loss and the measurement.

A store made with one loss must never be resumed with another that merely has the same name:
a ``functools.partial`` with other bound values, a closure over another value, an edited
function. What cannot be fingerprinted reliably is refused on resume, with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers_gt import make_problem
from infl import Objective
from infl.errors import InflError, StoreMismatchError
from infl.fingerprint import fingerprint
from infl.retrain import RetrainConfig, retrain_ground_truth
from infl.retrain.fingerprint import STORE_FORMAT

CFG = RetrainConfig(optimizer="sgd", lr=0.1, max_steps=2, grad_tol=None)


def tempered_bce(model, batch, temperature=1.0):
    x, y = batch
    return F.binary_cross_entropy_with_logits(
        model(x).squeeze(-1) / temperature, y, reduction="none"
    )


def make_closure_loss(scale: float):
    def scaled_bce(model, batch):
        x, y = batch
        return scale * F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y, reduction="none")

    return scaled_bce


@pytest.fixture(scope="module")
def problem():
    X, y, Xt, yt = make_problem(n=12, m=3)
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double().eval()
    return model, (X, y), (Xt, yt)


def _retrain(problem, loss, store, measurement=None):
    model, train, test = problem
    return retrain_ground_truth(
        model,
        Objective(loss),
        train,
        test,
        [0, 1],
        config=CFG,
        measurement=measurement,
        store=store,
        parallel_runs=1,
        progress=False,
    )


# ------------------------------------------------------------------------- through the store
def test_same_function_twice_resumes(problem, tmp_path):
    first = _retrain(problem, functools.partial(tempered_bce, temperature=2.0), tmp_path)
    again = _retrain(problem, functools.partial(tempered_bce, temperature=2.0), tmp_path)
    assert (first.num_computed, again.num_loaded, again.num_computed) == (3, 3, 0)
    torch.testing.assert_close(again.raw_change, first.raw_change)


def test_partial_with_other_arguments_is_refused(problem, tmp_path):
    _retrain(problem, functools.partial(tempered_bce, temperature=1.0), tmp_path)
    with pytest.raises(StoreMismatchError, match="'loss'") as info:
        _retrain(problem, functools.partial(tempered_bce, temperature=5.0), tmp_path)
    message = str(info.value)
    assert "temperature=1.0" in message
    assert "temperature=5.0" in message
    assert "new store path" in message


def test_partial_positional_and_nested_arguments_count(problem, tmp_path):
    a = fingerprint(functools.partial(functools.partial(tempered_bce), temperature=1.0))
    b = fingerprint(functools.partial(functools.partial(tempered_bce), temperature=1.5))
    assert a.digest != b.digest
    assert fingerprint(functools.partial(tempered_bce, temperature=1.0)).digest != (
        fingerprint(tempered_bce).digest
    )


def test_closure_with_other_value_is_refused(problem, tmp_path):
    _retrain(problem, make_closure_loss(1.0), tmp_path)
    _retrain(problem, make_closure_loss(1.0), tmp_path)  # a new closure over the same value
    with pytest.raises(StoreMismatchError, match="'loss'"):
        _retrain(problem, make_closure_loss(3.0), tmp_path)


def test_measurement_is_fingerprinted_too(problem, tmp_path):
    _retrain(problem, tempered_bce, tmp_path, measurement=make_closure_loss(1.0))
    with pytest.raises(StoreMismatchError, match="'measurement'"):
        _retrain(problem, tempered_bce, tmp_path, measurement=make_closure_loss(2.0))


def _define(source: str):
    namespace = {"F": F, "__name__": __name__}
    exec(compile(source, "<edited>", "exec"), namespace)  # same module, same qualname
    return namespace["edited_loss"]


_SOURCE = """
def edited_loss(model, batch):
    x, y = batch
    return F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y, reduction="none"){}
"""


def test_source_change_is_detected(problem, tmp_path):
    before, after = _define(_SOURCE.format("")), _define(_SOURCE.format(" * 2"))
    assert before.__qualname__ == after.__qualname__
    assert before.__module__ == after.__module__
    assert fingerprint(before).digest == fingerprint(_define(_SOURCE.format(""))).digest
    assert fingerprint(before).digest != fingerprint(after).digest
    _retrain(problem, before, tmp_path)
    with pytest.raises(StoreMismatchError, match="edited_loss"):
        _retrain(problem, after, tmp_path)


class _Opaque:
    """A loss holding something with no inspectable state (a lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __call__(self, model, batch):
        return tempered_bce(model, batch)


def test_unfingerprintable_loss_writes_a_new_store_but_never_resumes(problem, tmp_path):
    first = _retrain(problem, _Opaque(), tmp_path)  # a fresh store is fine
    assert first.num_computed == 3
    with pytest.raises(StoreMismatchError, match="cannot resume") as info:
        _retrain(problem, _Opaque(), tmp_path)
    message = str(info.value)
    assert isinstance(info.value, InflError)
    assert "loss.lock is a _thread.lock" in message
    assert "functools.partial" in message
    assert "new store directory" in message


def test_lambda_over_an_unfingerprintable_value_is_refused_on_resume(problem, tmp_path):
    handle = threading.Lock()

    def make():
        return lambda model, batch: tempered_bce(model, batch) + 0 * bool(handle)

    _retrain(problem, make(), tmp_path)
    with pytest.raises(StoreMismatchError, match=r"closure variable 'handle'"):
        _retrain(problem, make(), tmp_path)


def test_old_store_format_is_refused_not_misread(problem, tmp_path):
    _retrain(problem, tempered_bce, tmp_path)
    path = tmp_path / "config.json"
    settings = json.loads(path.read_text())
    assert settings["format"] == STORE_FORMAT == 2
    settings["format"] = 1
    settings["loss"] = "tests.retrain.test_fingerprint.tempered_bce"  # the old record
    path.write_text(json.dumps(settings))
    with pytest.raises(StoreMismatchError, match="format 1") as info:
        _retrain(problem, tempered_bce, tmp_path)
    assert "new store directory" in str(info.value)


# ------------------------------------------------------------------------------ fingerprint()
def test_plain_function_is_stable_and_reliable():
    a, b = fingerprint(tempered_bce), fingerprint(tempered_bce)
    assert a == b
    assert a.reliable
    assert a.label.endswith("tempered_bce")


def test_default_arguments_count():
    def f(x, t=1.0):
        return x / t

    g_digest = fingerprint(f).digest
    f.__defaults__ = (2.0,)
    assert fingerprint(f).digest != g_digest


def test_tensors_count_by_their_bytes():
    w = torch.ones(3, dtype=torch.float64)
    a = fingerprint(functools.partial(tempered_bce, temperature=w)).digest
    assert a == fingerprint(functools.partial(tempered_bce, temperature=w.clone())).digest
    w2 = w.clone()
    w2[1] = 1 + 1e-12
    assert a != fingerprint(functools.partial(tempered_bce, temperature=w2)).digest
    assert a != fingerprint(functools.partial(tempered_bce, temperature=w.float())).digest


@dataclasses.dataclass
class _Scaler:
    scale: float

    def loss(self, model, batch):
        return self.scale * tempered_bce(model, batch)


class _CallableLoss:
    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, model, batch):
        return tempered_bce(model, batch, self.temperature)


def test_bound_methods_and_callable_objects_count_their_state():
    assert fingerprint(_Scaler(1.0).loss).digest == fingerprint(_Scaler(1.0).loss).digest
    assert fingerprint(_Scaler(1.0).loss).digest != fingerprint(_Scaler(2.0).loss).digest
    assert fingerprint(_CallableLoss(1.0)).digest == fingerprint(_CallableLoss(1.0)).digest
    assert fingerprint(_CallableLoss(1.0)).digest != fingerprint(_CallableLoss(2.0)).digest
    assert fingerprint(_CallableLoss(1.0)).reliable


_GLOBAL_SCALE = 1.0


def _uses_global(model, batch):
    return _GLOBAL_SCALE * tempered_bce(model, batch)


def test_module_level_values_the_code_reads_count(monkeypatch):
    before = fingerprint(_uses_global).digest
    monkeypatch.setattr(sys.modules[__name__], "_GLOBAL_SCALE", 2.0)
    assert fingerprint(_uses_global).digest != before


def test_library_functions_and_modules_are_named_and_reliable():
    for fn in (F.cross_entropy, torch.tanh, Objective("mse"), nn.Linear(2, 2)):
        assert fingerprint(fn).reliable, fn
    assert fingerprint(nn.Linear(2, 2)).digest != fingerprint(nn.Linear(2, 2)).digest


def test_cycles_terminate_and_dict_order_does_not_matter():
    a: list = [1]
    a.append(a)
    assert fingerprint(a).reliable
    assert fingerprint({"x": 1, "y": 2}).digest == fingerprint({"y": 2, "x": 1}).digest
    assert fingerprint({"x": 1}).digest != fingerprint({"x": 2}).digest


def test_unreliable_parts_are_named():
    fp = fingerprint(functools.partial(tempered_bce, temperature=(x for x in [1.0])))
    assert not fp.reliable
    assert "keywords['temperature']" in fp.problems[0]
    assert "generator" in fp.problems[0]
