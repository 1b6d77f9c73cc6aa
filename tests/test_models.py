"""Tests of mpiqsgd.train.models: sizes, shapes, registry, determinism, trainability."""

import pytest
import torch
from torch import nn

from mpiqsgd.errors import ConfigError
from mpiqsgd.train.models import MODELS, build_model, count_parameters

EXPECTED_NAMES = {
    "tiny", "alexnet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet50",
}


def test_registry_names():
    assert set(MODELS) == EXPECTED_NAMES


@pytest.mark.parametrize(
    "name, low, high",
    [
        ("tiny", 1_000, 49_999),
        ("alexnet", 1_000_000, 10_000_000),
        ("resnet20", 260_000, 280_000),
        ("resnet32", 450_000, 475_000),
        ("resnet44", 640_000, 675_000),
        ("resnet56", 830_000, 870_000),
        ("resnet110", 1_700_000, 1_750_000),
        ("resnet50", 23_000_000, 24_000_000),
    ],
)
def test_parameter_counts(name, low, high):
    assert low <= count_parameters(build_model(name)) <= high


def test_resnet20_exact_count():
    assert count_parameters(build_model("resnet20")) == 269_722


def test_count_parameters_skips_frozen():
    model = build_model("tiny")
    total = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    model.classifier.weight.requires_grad_(False)
    assert count_parameters(model) == total - model.classifier.weight.numel()


def test_tiny_has_batchnorm_and_biases():
    model = build_model("tiny")
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(name.endswith("bias") for name, _ in model.named_parameters())


def test_resnet_shortcuts_are_parameter_free():
    model = build_model("resnet20")
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_forward_shape(name):
    torch.manual_seed(0)
    model = build_model(name)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 10)


@pytest.mark.parametrize("name", ["tiny", "alexnet", "resnet20"])
def test_num_classes(name):
    model = build_model(name, num_classes=7)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(3, 3, 32, 32)).shape == (3, 7)


def test_unknown_name_lists_choices():
    with pytest.raises(ConfigError) as info:
        build_model("resnet18")
    msg = str(info.value)
    assert "resnet18" in msg
    assert ", ".join(sorted(MODELS)) in msg


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_num_classes(bad):
    with pytest.raises(ConfigError):
        build_model("tiny", num_classes=bad)


@pytest.mark.parametrize("name", ["tiny", "alexnet", "resnet20"])
def test_same_seed_same_parameters(name):
    torch.manual_seed(123)
    a = build_model(name).state_dict()
    torch.manual_seed(123)
    b = build_model(name).state_dict()
    torch.manual_seed(124)
    c = build_model(name).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_eval_forward_deterministic():
    torch.manual_seed(0)
    model = build_model("alexnet").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_tiny_overfits_a_batch():
    torch.manual_seed(0)
    model = build_model("tiny")
    x = torch.randn(16, 3, 32, 32)
    y = torch.arange(16) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    first = None
    for _ in range(100):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if first is None:
            first = loss.item()
    assert first > 1.5
    assert loss.item() < 0.1 * first
