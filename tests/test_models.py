"""The model registry and the architectures in it."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from ferkit import models
from ferkit.data import FerData
from ferkit.inference import preprocess
from ferkit.models import count_macs, count_parameters, create_model, list_models, register_model


@pytest.fixture(scope="module")
def batch(small_data: FerData) -> torch.Tensor:
    """Two real faces, normalised: (2, 1, 48, 48)."""
    return preprocess(small_data["train"].images[:2])


@pytest.mark.parametrize("name", list_models())
def test_forward_gives_one_logit_per_class(name: str, batch: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    with torch.no_grad():
        logits = model(batch)
    assert logits.shape == (2, 7) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert not torch.equal(logits[0], logits[1])  # two different faces, two different outputs
    with torch.no_grad():
        assert create_model(name, num_classes=3).eval()(batch).shape == (2, 3)


@pytest.mark.parametrize("name", list_models())
def test_counts_are_positive_and_match_the_docstring(name: str) -> None:
    model = create_model(name)
    params, macs = count_parameters(model), count_macs(model)
    assert params > 0 and macs > params
    doc = models._REGISTRY[name].__doc__ or ""
    stated_params = re.search(r"([\d.,]+)( M)? parameters", doc)
    stated_macs = re.search(r"([\d.,]+) M multiply-adds", doc)
    assert stated_params and stated_macs, f"{name}'s docstring should state its parameters and multiply-adds"
    value = float(stated_params[1].replace(",", ""))
    if stated_params[2]:
        assert round(params / 1e6, 1) == value
    else:
        assert params == value
    assert round(macs / 1e6) == float(stated_macs[1])


def test_count_macs_leaves_no_hooks_and_keeps_the_mode() -> None:
    model = create_model("refcnn").train()
    count_macs(model)
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())
    model.eval()
    count_macs(model)
    assert not model.training


def test_refcnn_has_the_reference_size_and_shapes(batch: torch.Tensor) -> None:
    model = create_model("refcnn").eval()
    assert count_parameters(model) == 980_679
    assert count_macs(model) == 33_105_664  # 663,552 + 3 x 10,616,832 (convs) + 591,616 (linear)
    shapes: list[tuple[int, ...]] = []
    blocks = list(model.features.children())
    handles = [block.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape))) for block in blocks]
    with torch.no_grad():
        model(batch)
    for handle in handles:
        handle.remove()
    assert shapes == [(2, 32, 24, 24), (2, 64, 12, 12), (2, 128, 6, 6), (2, 256, 3, 3)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 32, (3, 3), (1, 1)), (32, 64, (3, 3), (1, 1)), (64, 128, (3, 3), (1, 1)), (128, 256, (3, 3), (1, 1))]
    linears = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [(2304, 256), (256, 7)]


def test_channels_last_gives_the_same_logits(batch: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = create_model("refcnn").eval()
    with torch.no_grad():
        plain = model(batch)
        fast = model.to(memory_format=torch.channels_last)(batch.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_unknown_architecture_lists_the_choices() -> None:
    with pytest.raises(ValueError) as err:
        create_model("alexnet")
    message = str(err.value)
    assert "'alexnet'" in message
    assert message.endswith(", ".join(list_models()))
    assert "refcnn" in list_models()


def test_a_name_cannot_be_registered_twice() -> None:
    def refcnn(num_classes: int = 7) -> nn.Module:
        return nn.Linear(1, num_classes)

    with pytest.raises(ValueError, match="registered twice"):
        register_model(refcnn)
    assert isinstance(create_model("refcnn"), models.ReferenceCNN)


def test_resnet_hr_has_resnets_parameters_at_twice_the_resolution(batch: torch.Tensor) -> None:
    low, high = create_model("resnet"), create_model("resnet_hr")
    assert {k: v.shape for k, v in low.state_dict().items()} == {k: v.shape for k, v in high.state_dict().items()}
    sizes: dict[str, list[int]] = {}
    for name, model in (("resnet", low), ("resnet_hr", high)):
        assert isinstance(model, models.ResNet)
        x = model.stem(batch)  # the side of each block's output, 48x48 in
        sizes[name] = [int((x := block(x)).shape[-1]) for block in model.stages]
    assert sizes["resnet"] == [24, 24, 12, 12, 6, 6, 3, 3]
    assert sizes["resnet_hr"] == [48, 48, 24, 24, 12, 12, 6, 6]
