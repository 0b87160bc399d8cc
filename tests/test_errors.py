"""Each class of bad input raises an InflError subclass whose message says what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from infl import (
    ConjugateGradient,
    ExactHessian,
    InflError,
    InfluenceCalculator,
    InputError,
    ModelStateError,
    NonFiniteError,
    NotPositiveDefiniteError,
    Objective,
)

# the untrained models here are not at a minimum; that check has tests of its own
pytestmark = pytest.mark.filterwarnings("ignore:the model is not at a minimum")


def _data(n=10):
    return torch.randn(n, 3), torch.randint(0, 2, (n,))


def _calc(model=None, data=None, solver=None, **kwargs):
    return InfluenceCalculator(
        model or nn.Linear(3, 2).eval(),
        kwargs.pop("objective", Objective(weight_decay=0.1)),
        data if data is not None else _data(),
        solver or ConjugateGradient(),
        progress=False,
        **kwargs,
    )


def test_all_errors_share_a_base_class():
    for cls in (InputError, ModelStateError, NonFiniteError, NotPositiveDefiniteError):
        assert issubclass(cls, InflError)


def test_mismatched_input_and_target_lengths():
    with pytest.raises(InputError, match=r"different leading sizes \[9, 10\]"):
        _calc(data=(torch.randn(10, 3), torch.randint(0, 2, (9,))))


def test_empty_training_data():
    with pytest.raises(InputError, match="training data is empty"):
        _calc(data=(torch.randn(0, 3), torch.randint(0, 2, (0,))))


def test_wrong_feature_dimension_in_test_data_is_reported_by_torch():
    calc = _calc()
    with pytest.raises(RuntimeError):
        calc.influence((torch.randn(2, 5), torch.randint(0, 2, (2,))))


def test_nan_parameters():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(ModelStateError, match=r"parameter 'weight' contains NaN"):
        _calc(model=model)


def test_nothing_trainable():
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ModelStateError, match="no trainable parameters"):
        _calc(model=model)


@pytest.mark.parametrize("layer", [nn.Dropout(0.5), nn.BatchNorm1d(4)])
def test_train_mode_dropout_or_batchnorm(layer):
    model = nn.Sequential(nn.Linear(3, 4), layer, nn.Linear(4, 2))
    model.train()
    with pytest.raises(ModelStateError, match=r"training mode.*model\.eval\(\)"):
        _calc(model=model)
    _calc(model=model.eval())  # fine in eval mode


def test_indefinite_hessian_with_cg():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).eval()
    calc = _calc(model=model, objective=Objective(), solver=ConjugateGradient(max_iter=500))
    with pytest.raises(NotPositiveDefiniteError, match="negative curvature"):
        calc.influence(_data(2))


def test_indefinite_hessian_with_exact_names_the_damping():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).eval()
    calc = _calc(model=model, objective=Objective(), solver=ExactHessian())
    with pytest.raises(NotPositiveDefiniteError, match="Use damping >"):
        calc.influence(_data(2))


def test_shuffling_loader_is_refused():
    with pytest.raises(InputError, match="shuffle=False"):
        _calc(data=DataLoader(TensorDataset(*_data()), shuffle=True))


def test_loss_must_return_one_value_per_example():
    bad = Objective(loss=lambda model, batch: model(batch[0]).sum())
    with pytest.raises(InputError, match="one value per example"):
        _calc(objective=bad)  # the first examples are evaluated at construction


def test_non_finite_inputs_are_caught_where_they_appear():
    x, y = _data()
    x[4, 1] = float("inf")
    with pytest.raises(NonFiniteError, match="example 4"):
        _calc(data=(x, y))  # the minimum check's gradient pass meets it at construction
    calc = _calc(data=(x, y), check_minimum=False)
    with pytest.raises(NonFiniteError, match="example 4"):
        calc.train_grads()


def test_unsupported_data_type_and_bad_indices():
    with pytest.raises(InputError, match="cannot index a str"):
        _calc(data="data.csv")
    calc = _calc()
    with pytest.raises(InputError, match="index 10 is out of range for 10"):
        calc.param_change([10])
    with pytest.raises(InputError, match=r"k must be in 1\.\.10"):
        calc.top_k(_data(2), 11)


def test_objective_validation():
    with pytest.raises(InputError, match="weight_decay"):
        Objective(weight_decay=-1.0)
    with pytest.raises(InputError, match="unknown loss"):
        Objective(loss="hinge")


# ---------------------------------------------------------------- where data first meets the model
def test_wrong_feature_width_names_the_first_layer_and_both_widths():
    with pytest.raises(InputError, match=r"first linear layer '0' expects 3 features.*has 5"):
        _calc(model=nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval(),
              data=(torch.randn(10, 5), torch.randint(0, 2, (10,))))  # fmt: skip


def test_integer_inputs_to_a_float_model_say_to_convert():
    x = torch.randint(0, 5, (10, 3))
    with pytest.raises(InputError, match=r"integer tensors \(torch\.int64\).*X\.to\(torch\.float"):
        _calc(data=(x, torch.randint(0, 2, (10,))))


def test_column_targets_for_cross_entropy_get_a_squeeze_hint():
    x, y = _data()
    with pytest.raises(InputError, match=r"shape \(4, 1\).*y\.squeeze\(1\)"):
        _calc(data=(x, y[:, None]))
    with pytest.raises(InputError, match=r"torch\.float32.*y\.long\(\)"):
        _calc(data=(x, y.float()))


def test_out_of_range_label_names_the_example_value_and_classes():
    x, y = _data(10)
    y[2] = 7
    with pytest.raises(InputError, match=r"example 2 has label 7.*2 classes.*0\.\.1"):
        _calc(data=(x, y))
    # past the first examples it is found in the construction pass, by its own index
    y[2], y[9] = 0, 2
    with pytest.raises(InputError, match=r"example 9 has label 2, but the model outputs 2"):
        _calc(data=(x, y), chunk_size=3)
    y[9] = -1
    with pytest.raises(InputError, match=r"example 9 has label -1"):
        _calc(data=(x, y), chunk_size=3)


def test_ignore_index_labels_are_refused_naming_the_examples():
    x, y = _data(10)
    y[[1, 3]] = -100
    with pytest.raises(InputError, match=r"examples 1, 3 have the ignore_index label -100.*Drop"):
        _calc(data=(x, y))


def test_a_list_of_pairs_says_to_stack_or_use_a_dataset():
    x, y = _data(6)
    pairs = [(x[i], y[i]) for i in range(6)]
    with pytest.raises(InputError, match=r"list of 6 tuples.*torch\.stack.*Dataset"):
        _calc(data=pairs)
    with pytest.raises(InputError, match=r"torch\.stack.*Dataset"):
        _calc(data=pairs[:2])  # two pairs look like (X, y) at first sight
    _calc(data=TensorDataset(x, y))  # what the message suggests works


def test_other_forward_errors_are_ours_and_keep_torchs_message():
    class NeedsTwo(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x.reshape(x.shape[0], 2, -1))  # a bug inside the model

    with pytest.raises(InputError, match=r"first 4 examples failed.*PyTorch said: RuntimeError"):
        _calc(model=NeedsTwo().eval())
