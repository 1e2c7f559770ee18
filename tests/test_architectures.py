import pytest
import torch
import torch.nn.functional as F

from robaudit.audit.models.architectures import (ARCHITECTURES, WideResNet, build_wide_resnet,
                                          check_architecture, create_architecture,
                                          infer_wide_resnet,
                                          resolve_architecture)
from robaudit.errors import UserError

from conftest import randomise_batchnorm

BIG = 15_000_000  # parameters; bigger registered models are checked on the meta device


def _n_params(model, skip=()):
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip))


@pytest.mark.parametrize("name", ARCHITECTURES.names())
def test_registered_architecture_gives_logits_for_cifar_input(name):
    with torch.device("meta"):
        big = _n_params(create_architecture(name, num_classes=7)) > BIG
    if big:  # WRN-70-16 & co.: shapes only, no 100M+ parameter allocation
        with torch.device("meta"):
            model = create_architecture(name, num_classes=7).eval()
            assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)
        return
    from robaudit.audit.models.paper_architectures import ARCH_INPUT_SHAPES

    torch.manual_seed(0)
    model = create_architecture(name, num_classes=7).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, *ARCH_INPUT_SHAPES.get(name, (3, 32, 32))))
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
    assert "6n+4" in message and "\n" not in message


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


# --- names users type ------------------------------------------------------------------

ALIASES = [
    ("wrn34", "wrn-34-10"), ("wideresnet34-10", "wrn-34-10"), ("wrn-34-10", "wrn-34-10"),
    ("WRN_34_10", "wrn-34-10"), ("WideResNet-34-10", "wrn-34-10"), ("wrn34-10", "wrn-34-10"),
    ("wrn28", "wrn-28-10"), ("Wide_ResNet_28_10", "wrn-28-10"), ("WRN-70-16", "wrn-70-16"),
    ("wrn-40-2", "wrn-40-2"), ("wrn16x4", "wrn-16-4"),
    ("DMWideResNet-70-16", "dm-wrn-70-16"), ("dm_wrn_28_10", "dm-wrn-28-10"),
    ("dm-wrn-106-16", "dm-wrn-106-16"), ("DMPreActResNet18", "dm-preactresnet18"),
    ("mobilenet_v2", "mobilenetv2"), ("mobilenetv2", "mobilenetv2"),
    ("MobileNetV2", "mobilenetv2"), ("torchvision:mobilenet_v2", "torchvision:mobilenet_v2"),
    ("PreActResNet18", "preactresnet18"), ("preact_resnet_18_fast", "preactresnet18-fast"),
    ("PreActResNet-18-kuangliu", "preactresnet18-kuangliu"), ("resnet18", "resnet18"),
    ("wide_resnet50_2", "torchvision:wide_resnet50_2"), ("vit-b-16", "torchvision:vit_b_16"),
    ("ResNet50", "torchvision:resnet50"),
]


@pytest.mark.parametrize("typed,canonical", ALIASES)
def test_aliases_resolve_to_canonical_names(typed, canonical):
    assert resolve_architecture(typed)[0] == canonical
    assert check_architecture(typed) == canonical


def test_resolver_notes_say_what_was_assumed_or_shadowed():
    assert resolve_architecture("wrn-34-10")[1] is None
    assert "width 10" in resolve_architecture("wrn34")[1]
    assert resolve_architecture("mobilenet_v2") == (
        "mobilenetv2", "mobilenet_v2 -> mobilenetv2 (CIFAR form, 32x32); torchvision's "
        "ImageNet model is torchvision:mobilenet_v2")
    assert "torchvision:resnet18" in resolve_architecture("resnet18")[1]
    assert resolve_architecture("torchvision:mobilenet_v2")[1] is None
    assert type(create_architecture("mobilenet_v2")).__name__ == "MobileNetV2"
    assert hasattr(create_architecture("mobilenet_v2"), "linear")  # CIFAR head
    assert not hasattr(create_architecture("torchvision:mobilenet_v2"), "linear")


@pytest.mark.parametrize("typed", ["wrn-33-10", "wrn-4-10", "wrn-34-0", "torchvision:nope"])
def test_invalid_wide_resnet_and_torchvision_names_are_user_errors(typed):
    with pytest.raises(UserError):
        check_architecture(typed)


def test_build_wide_resnet_checks_depth_and_width():
    for depth, width in ((33, 10), (4, 10), (28, 0)):
        for dm in (False, True):
            with pytest.raises(ValueError):
                build_wide_resnet(depth, width, dm=dm)


# --- key names as in the original repositories -----------------------------------------
# Generators written from the originals' module trees (attribute names, nesting, order).

BN = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def _bn(prefix):
    return [f"{prefix}.{s}" for s in BN]


def preact_keys(final_bn):
    """kuangliu / fast_adversarial / robust_overfitting / RobustBench PreActResNet18."""
    keys = ["conv1.weight"]
    for layer in range(1, 5):
        for b in range(2):
            p = f"layer{layer}.{b}"
            keys += _bn(f"{p}.bn1") + [f"{p}.conv1.weight"] + _bn(f"{p}.bn2") + [f"{p}.conv2.weight"]
            if layer > 1 and b == 0:
                keys.append(f"{p}.shortcut.0.weight")
    return keys + (_bn("bn") if final_bn else []) + ["linear.weight", "linear.bias"]


def trades_wrn_keys(depth, width):
    """TRADES models/wideresnet.py (sub_block1 defined, never called)."""
    n, keys = (depth - 4) // 6, ["conv1.weight"]
    groups = [("block1", 16, 16 * width), ("sub_block1", 16, 16 * width),
              ("block2", 16 * width, 32 * width), ("block3", 32 * width, 64 * width)]
    for name, cin, cout in groups:
        for i in range(n):
            p = f"{name}.layer.{i}"
            keys += _bn(f"{p}.bn1") + [f"{p}.conv1.weight"] + _bn(f"{p}.bn2") + [f"{p}.conv2.weight"]
            if i == 0 and cin != cout:
                keys.append(f"{p}.convShortcut.weight")
    return keys + _bn("bn1") + ["fc.weight", "fc.bias"]


def dm_wrn_keys(depth, width):
    """RobustBench dm_wide_resnet.py DMWideResNet (mean/std not in the state_dict)."""
    n, keys = (depth - 4) // 6, ["init_conv.weight"]
    for g, (cin, cout) in enumerate([(16, 16 * width), (16 * width, 32 * width),
                                     (32 * width, 64 * width)]):
        for i in range(n):
            p = f"layer.{g}.block.{i}"
            keys += _bn(f"{p}.batchnorm_0") + [f"{p}.conv_0.weight"]
            keys += _bn(f"{p}.batchnorm_1") + [f"{p}.conv_1.weight"]
            if i == 0 and cin != cout:
                keys.append(f"{p}.shortcut.weight")
    return keys + _bn("batchnorm") + ["logits.weight", "logits.bias"]


def dm_preact_keys():
    """RobustBench dm_wide_resnet.py DMPreActResNet, depth 18."""
    keys = ["conv_2d.weight"]
    for g in range(4):
        for i in range(2):
            p = f"layer_{g}.{i}"
            keys += _bn(f"{p}.batchnorm_0") + [f"{p}.conv_2d_1.weight"]
            keys += _bn(f"{p}.batchnorm_1") + [f"{p}.conv_2d_2.weight"]
            if g > 0 and i == 0:
                keys.append(f"{p}.shortcut.weight")
    return keys + _bn("batchnorm") + ["logits.weight", "logits.bias"]


def _keys(name):
    with torch.device("meta"):
        return list(create_architecture(name).state_dict())


@pytest.mark.parametrize("name,expected,count", [
    ("preactresnet18", preact_keys(final_bn=True), 107),
    ("preactresnet18-fast", preact_keys(final_bn=True), 107),
    ("preactresnet18-kuangliu", preact_keys(final_bn=False), 102),
    ("preactresnet18-robustbench", preact_keys(final_bn=False), 102),
    ("wrn-28-10", trades_wrn_keys(28, 10), 204),
    ("wrn-34-10", trades_wrn_keys(34, 10), 252),
    ("wrn-34-20", trades_wrn_keys(34, 20), 252),
    ("wrn-70-16", trades_wrn_keys(70, 16), 540),
    ("dm-wrn-28-10", dm_wrn_keys(28, 10), 155),
    ("dm-wrn-34-10", dm_wrn_keys(34, 10), 191),
    ("dm-wrn-34-20", dm_wrn_keys(34, 20), 191),
    ("dm-wrn-70-16", dm_wrn_keys(70, 16), 407),
    ("dm-wrn-106-16", dm_wrn_keys(106, 16), 623),
    ("dm-preactresnet18", dm_preact_keys(), 107),
])
def test_state_dict_keys_match_the_original_code(name, expected, count):
    keys = _keys(name)
    assert keys == expected and len(keys) == count


def test_state_dict_landmarks_from_the_originals():
    with torch.device("meta"):
        dm = create_architecture("dm-wrn-70-16").state_dict()
        dm_pre = create_architecture("dm-preactresnet18").state_dict()
        fast = create_architecture("preactresnet18-fast").state_dict()
    assert list(dm)[:3] == ["init_conv.weight", "layer.0.block.0.batchnorm_0.weight",
                            "layer.0.block.0.batchnorm_0.bias"]
    assert list(dm)[-2:] == ["logits.weight", "logits.bias"]
    assert dm["layer.2.block.0.shortcut.weight"].shape == (1024, 512, 1, 1)
    assert "layer.0.block.1.shortcut.weight" not in dm and "mean" not in dm
    assert dm_pre["layer_1.0.shortcut.weight"].shape == (128, 64, 3, 3)  # 3x3 projection
    assert fast["layer2.0.shortcut.0.weight"].shape == (128, 64, 1, 1)
    assert fast["linear.weight"].shape == (10, 512) and "bn.weight" in fast


# --- WideResNet sizes ------------------------------------------------------------------


def wrn_param_count(depth, width, classes=10):
    """Closed form for the used part of WRN-depth-width (TRADES / DM, no sub_block1)."""
    n, c = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
    total = 3 * 9 * 16
    for cin, cout in zip(c[:-1], c[1:]):
        total += 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout
        total += cin * cout if cin != cout else 0
        total += (n - 1) * (4 * cout + 18 * cout * cout)
    return total + 2 * c[3] + c[3] * classes + classes


@pytest.mark.parametrize("depth,width,millions", [
    (28, 10, 36.48), (34, 10, 46.16), (34, 20, 184.53), (70, 16, 266.80)])
def test_wide_resnet_parameter_counts(depth, width, millions):
    assert round(wrn_param_count(depth, width) / 1e6, 2) == millions  # published sizes
    with torch.device("meta"):
        trades = create_architecture(f"wrn-{depth}-{width}")
        dm = create_architecture(f"dm-wrn-{depth}-{width}")
    assert _n_params(trades, skip=("sub_block1.",)) == wrn_param_count(depth, width)
    assert _n_params(dm) == wrn_param_count(depth, width)


def test_generic_wide_resnet_and_inference_from_state_dict():
    for name in ("wrn-16-2", "dm-wrn-16-2", "wrn-40-4", "dm-wrn-22-1"):
        with torch.device("meta"):
            state = create_architecture(name, num_classes=100).state_dict()
        assert infer_wide_resnet(state) == name
    state = {k: v for k, v in WideResNet(16, 2).state_dict().items()
             if not k.startswith("sub_block1.")}
    assert infer_wide_resnet(state) == "wrn-16-2"
    assert infer_wide_resnet(create_architecture("resnet18").state_dict()) is None
    assert create_architecture("WRN-16-2", num_classes=3)(torch.rand(1, 3, 32, 32)).shape == (1, 3)


# --- forwards against hand-written references ------------------------------------------


def _bn_eval(x, s, p):
    return F.batch_norm(x, s[f"{p}.running_mean"], s[f"{p}.running_var"], s[f"{p}.weight"],
                        s[f"{p}.bias"], False, 0.0, 1e-5)


def reference_preact(s, x, shortcut_from_input, final_bn):
    """The originals' PreActResNet18 forward, written out on a state_dict."""
    out = F.conv2d(x, s["conv1.weight"], padding=1)
    for layer, stride in zip(range(1, 5), (1, 2, 2, 2)):
        for b in range(2):
            p = f"layer{layer}.{b}"
            pre = F.relu(_bn_eval(out, s, f"{p}.bn1"))
            if f"{p}.shortcut.0.weight" in s:
                src = out if shortcut_from_input else pre
                shortcut = F.conv2d(src, s[f"{p}.shortcut.0.weight"], stride=stride if b == 0 else 1)
            else:
                shortcut = out
            h = F.conv2d(pre, s[f"{p}.conv1.weight"], stride=stride if b == 0 else 1, padding=1)
            h = F.conv2d(F.relu(_bn_eval(h, s, f"{p}.bn2")), s[f"{p}.conv2.weight"], padding=1)
            out = h + shortcut
    if final_bn:
        out = F.relu(_bn_eval(out, s, "bn"))
    out = F.avg_pool2d(out, 4).view(out.size(0), -1)
    return F.linear(out, s["linear.weight"], s["linear.bias"])


@pytest.mark.parametrize("name,from_input,final_bn", [
    ("preactresnet18", False, True), ("preactresnet18-fast", True, True),
    ("preactresnet18-kuangliu", False, False), ("preactresnet18-robustbench", True, False)])
def test_preact_forward_matches_the_original(name, from_input, final_bn):
    torch.manual_seed(1)
    model = randomise_batchnorm(create_architecture(name), affine=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference_preact(model.state_dict(), x, from_input, final_bn)
        wrong = reference_preact(model.state_dict(), x, not from_input, final_bn)
        got = model(x)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, wrong, atol=1e-3)


def test_preact_shortcut_source_changes_logits_for_the_same_weights():
    torch.manual_seed(2)
    rice = randomise_batchnorm(create_architecture("preactresnet18"), affine=True)
    fast = create_architecture("preactresnet18-fast")
    fast.load_state_dict(rice.state_dict(), strict=True)
    fast.eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert (rice(x) - fast(x)).abs().max() > 1e-3
        block = fast.layer2[0]  # has a projection: shortcut from the raw x
        s = {k: v for k, v in block.state_dict().items()}
        h = torch.rand(2, 64, 16, 16)
        pre = F.relu(_bn_eval(h, s, "bn1"))
        ref = F.conv2d(F.relu(_bn_eval(F.conv2d(pre, s["conv1.weight"], stride=2, padding=1), s, "bn2")),
                       s["conv2.weight"], padding=1) + F.conv2d(h, s["shortcut.0.weight"], stride=2)
        assert torch.allclose(block(h), ref, atol=1e-5)


CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
CIFAR100 = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def _swish(x):
    return x * torch.sigmoid(x)


def _same(x, stride):
    return F.pad(x, (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1))


def reference_dm_wrn(s, x, depth, constants):
    """RobustBench DMWideResNet.forward written out on a state_dict."""
    mean, std = (torch.tensor(c).view(3, 1, 1) for c in constants)
    out = F.conv2d((x - mean) / std, s["init_conv.weight"], padding=1)
    for g, stride in enumerate((1, 2, 2)):
        for i in range((depth - 4) // 6):
            p, st = f"layer.{g}.block.{i}", stride if i == 0 else 1
            pre = _swish(_bn_eval(out, s, f"{p}.batchnorm_0"))
            has = f"{p}.shortcut.weight" in s
            residual = F.conv2d(pre, s[f"{p}.shortcut.weight"], stride=st) if has else out
            h = F.conv2d(_same(pre, st), s[f"{p}.conv_0.weight"], stride=st)
            h = F.conv2d(_swish(_bn_eval(h, s, f"{p}.batchnorm_1")), s[f"{p}.conv_1.weight"], padding=1)
            out = residual + h
    out = F.avg_pool2d(_swish(_bn_eval(out, s, "batchnorm")), 8).flatten(1)
    return F.linear(out, s["logits.weight"], s["logits.bias"])


@pytest.mark.parametrize("classes,constants", [(10, CIFAR10), (100, CIFAR100)])
def test_dm_wide_resnet_forward_normalises_like_robustbench(classes, constants):
    torch.manual_seed(3)
    model = randomise_batchnorm(create_architecture("dm-wrn-16-2", num_classes=classes), affine=True)
    x = torch.rand(2, 3, 32, 32)
    other = CIFAR100 if constants is CIFAR10 else CIFAR10
    with torch.no_grad():
        got = model(x)
        assert torch.allclose(got, reference_dm_wrn(model.state_dict(), x, 16, constants), atol=1e-4)
        assert not torch.allclose(got, reference_dm_wrn(model.state_dict(), x, 16, other), atol=1e-4)
    info = model.input_normalization
    assert info["constants"] == ("cifar10" if classes == 10 else "cifar100")
    assert info["mean"] == constants[0] and info["std"] == constants[1]


def test_dm_preact_block_takes_a_3x3_shortcut_from_the_padded_input():
    torch.manual_seed(4)
    model = randomise_batchnorm(create_architecture("dm-preactresnet18"), affine=True)
    block, x = model.layer_1[0], torch.rand(2, 64, 16, 16)
    s = block.state_dict()
    with torch.no_grad():
        h = F.conv2d(_same(_swish(_bn_eval(x, s, "batchnorm_0")), 2), s["conv_2d_1.weight"], stride=2)
        h = F.conv2d(_swish(_bn_eval(h, s, "batchnorm_1")), s["conv_2d_2.weight"], padding=1)
        ref = h + F.conv2d(_same(x, 2), s["shortcut.weight"], stride=2)
        assert torch.allclose(block(x), ref, atol=1e-5)
        # Whole model: the normalisation is inside forward.
        img = torch.rand(2, 3, 32, 32)
        mean, std = (torch.tensor(c).view(3, 1, 1) for c in CIFAR10)
        stem = F.conv2d((img - mean) / std, model.conv_2d.weight, padding=1)
        out = model.layer_3(model.layer_2(model.layer_1(model.layer_0(stem))))
        out = F.avg_pool2d(_swish(model.batchnorm(out)), 4).flatten(1)
        assert torch.allclose(model(img), model.logits(out), atol=1e-5)


def test_dm_checkpoints_with_or_without_mean_std_load_strictly():
    source = create_architecture("dm-wrn-10-1")
    plain = source.state_dict()
    assert "mean" not in plain and "std" not in plain
    create_architecture("dm-wrn-10-1").load_state_dict(plain, strict=True)
    with_buffers = dict(plain, mean=torch.full((3, 1, 1), 0.5), std=torch.full((3, 1, 1), 0.25))
    target = create_architecture("dm-wrn-10-1")
    target.adapt_to_state_dict(with_buffers.keys())
    target.load_state_dict(with_buffers, strict=True)
    assert target.input_normalization["mean"] == (0.5, 0.5, 0.5)
    assert target.input_normalization["std"] == (0.25, 0.25, 0.25)
    assert target.input_normalization["constants"] == "checkpoint"
