"""Function-preserving widening: a narrow model's weights in a wider model of the same layout."""

from __future__ import annotations

import re

import pytest
import torch

from ferkit.data import FerData
from ferkit.inference import preprocess
from ferkit.models import create_model
from ferkit.widen import widen_into, widen_problem


@pytest.fixture(scope="module")
def faces(small_data: FerData) -> torch.Tensor:
    return preprocess(small_data["train"].images[:16])


def _trained_narrow() -> torch.nn.Module:
    """A `resnet` with non-trivial BatchNorm statistics, as a trained one has."""
    torch.manual_seed(0)
    narrow = create_model("resnet")
    for module in narrow.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return narrow.eval()


def test_widening_without_noise_keeps_the_function(faces: torch.Tensor) -> None:
    narrow = _trained_narrow()
    wide = create_model("resnet_wide").eval()
    widen_into(narrow, wide, noise=0.0)
    with torch.no_grad():
        torch.testing.assert_close(wide(faces), narrow(faces), rtol=1e-4, atol=1e-5)
        # in training mode too: BatchNorm's batch statistics of a copied channel are its original's
        narrow.stages.train(), wide.stages.train()  # type: ignore[union-attr]
        torch.testing.assert_close(wide.stages(wide.stem(faces)).mean((2, 3))[:, :256],  # type: ignore[operator]
                                   narrow.stages(narrow.stem(faces)).mean((2, 3)),  # type: ignore[operator]
                                   rtol=1e-4, atol=1e-5)
    assert wide.stages[0].bn1.num_batches_tracked == narrow.stages[0].bn1.num_batches_tracked  # type: ignore[index]


def test_noise_sets_the_copies_apart_but_keeps_the_outputs_close(faces: torch.Tensor) -> None:
    narrow = _trained_narrow()
    wide = create_model("resnet_wide").eval()
    torch.manual_seed(1)
    widen_into(narrow, wide, noise=0.01)
    conv = wide.stages[2].conv1.weight  # type: ignore[index]
    assert not torch.equal(conv[:128], conv[128:])  # copy c and copy c + 128 differ
    with torch.no_grad():
        expected = narrow(faces)
        error = (wide(faces) - expected).abs().max()
    assert 0 < error < 0.05 * expected.abs().max()


@pytest.mark.parametrize(("narrow", "wide", "why"), [
    ("resnet_wide", "resnet", r"does not divide"),
    ("resnet", "vgg", r"different layers"),
    ("refcnn", "resnet", r"different layers"),
])
def test_what_cannot_be_widened_is_refused(narrow: str, wide: str, why: str) -> None:
    a, b = create_model(narrow), create_model(wide)
    problem = widen_problem(a, b)
    assert problem is not None and re.search(why, problem)
    with pytest.raises(ValueError, match=why):
        widen_into(a, b)


def test_a_model_widens_into_its_own_shapes_as_a_copy(faces: torch.Tensor) -> None:
    narrow = _trained_narrow()
    same = create_model("resnet_hr").eval()  # the same parameters, other strides
    assert widen_problem(narrow, same) is None
    widen_into(narrow, same, noise=0.0)
    for name, tensor in narrow.state_dict().items():
        torch.testing.assert_close(same.state_dict()[name], tensor, rtol=0, atol=0)
