import pytest
import torch

from robaudit.audit.architectures import (ARCHITECTURES, WideResNet, create_architecture,
                                          list_architectures)
from robaudit.errors import UserError


@pytest.mark.parametrize("name", ARCHITECTURES.names())
def test_registered_architecture_gives_logits_for_cifar_input(name):
    torch.manual_seed(0)
    model = create_architecture(name, num_classes=7).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "torchvision:resnet18", "ResNet50"])
def test_torchvision_names_build_without_weights(name):
    model = create_architecture(name, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 5)


def test_names_are_case_insensitive_and_cifar_names_win():
    model = create_architecture("SmallCNN", num_classes=3)
    assert type(model).__name__ == "SmallCNN"
    # "resnet18" is the CIFAR form (3x3 stem, `linear` head), not torchvision's.
    assert hasattr(create_architecture("RESNET18"), "linear")
    assert hasattr(create_architecture("torchvision:resnet18"), "fc")


def test_unknown_architecture_lists_choices():
    with pytest.raises(UserError) as err:
        create_architecture("resnet19")
    message = str(err.value)
    assert "resnet19" in message and "smallcnn" in message and "wrn-34-10" in message
    assert "\n" not in message


def test_list_architectures_has_registered_then_torchvision():
    names = list_architectures()
    assert names[:len(ARCHITECTURES.names())] == ARCHITECTURES.names()
    assert "resnet50" in names and "torchvision:resnet18" in names


def test_smallcnn_is_small():
    params = sum(p.numel() for p in create_architecture("smallcnn").parameters())
    assert 20_000 <= params <= 100_000


def test_wideresnet_drops_unused_sub_block_for_weights_without_it():
    source = WideResNet(depth=10, widen_factor=1)
    weights = {k: v for k, v in source.state_dict().items() if not k.startswith("sub_block1.")}
    target = WideResNet(depth=10, widen_factor=1)
    target.adapt_to_state_dict(weights.keys())
    target.load_state_dict(weights, strict=True)  # raises if sub_block1 were still expected
    kept = WideResNet(depth=10, widen_factor=1)
    kept.adapt_to_state_dict(source.state_dict().keys())
    assert kept.sub_block1 is not None
