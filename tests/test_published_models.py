"""Published robust models, saved as their repositories' training scripts save them (issue 16).

Each replica below is the original network class re-typed with its key layout and forward
(not robaudit's own architecture code), given random weights, and written the way the
repository writes it:

* TRADES `train_trades_cifar10.py` and MART `train_wideresnet.py`: `torch.save(model.state_dict())`
  of their WideResNet (which defines, and never calls, `sub_block1`); RSLAD and ABSLD load that
  same file as their teacher. AWP `trades_AWP/train_trades_cifar.py` trains
  `nn.DataParallel(WideResNet34)`, so its keys carry `module.`; ABSLD's
  `resnet18_absld_cifar10.py` saves `{"model": state_dict, "optimizer": ..., "epoch": ...}`.
* locuslab/fast_adversarial `CIFAR10/train_fgsm.py`: `torch.save(model.state_dict())` of its
  PreActResNet18 (shortcut projection from the raw x, final `bn`) after apex amp O2, which
  keeps convolutions and the linear layer in float16 and BatchNorm in float32. Inputs are
  normalised outside the model (`CIFAR10/utils.py`: CIFAR-10 mean, std 0.2471/0.2435/0.2616).
* kuangliu/pytorch-cifar `main.py`: `{"net": net.state_dict(), "acc", "epoch"}` with `net`
  wrapped in DataParallel (on CUDA), PreActResNet18 with the projection from relu(bn1(x)) and
  no final BN; inputs normalised outside with its own std 0.2023/0.1994/0.2010.

WideResNets are WRN-10-1 (the same family and key layout as WRN-34-10, a thousand times
cheaper); that the real WRN-34-10 layout is inferred too is checked on the meta device.
The PreAct ResNet-18s run at 32x32 (their forward pools a fixed 4x4) on 25 images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robaudit.audit.models import arch_inference
from robaudit.audit.models.loading import load_model

from conftest import assert_is_argmax, assert_logits_close, logit_tolerance, randomise_batchnorm
from test_cli import run_cli
from test_engine import CLASSES, make_arrays

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)    # fast_adversarial CIFAR10/utils.py, CFA utils.py
KUANGLIU_STD = (0.2023, 0.1994, 0.2010)   # kuangliu/pytorch-cifar main.py transforms.Normalize
NUM_CLASSES = len(CLASSES)
SCAN = ["--device", "cpu", "--attacks", "clean", "--no-report", "--threads", "1"]


# --- the original classes ------------------------------------------------------------------


class TradesBlock(nn.Module):
    """TRADES models/wideresnet.py BasicBlock: with a width change the shortcut convolution
    sees relu(bn1(x)), otherwise the raw x."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equalInOut = cin == cout
        self.convShortcut = None if self.equalInOut else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        return (x if self.equalInOut else self.convShortcut(pre)) + out


class TradesNetworkBlock(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[TradesBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class TradesWideResNet(nn.Module):
    """TRADES / MART / RSLAD / ABSLD WideResNet (depth 34, widen 10 in the papers)."""

    def __init__(self, depth=34, num_classes=10, widen_factor=10):
        super().__init__()
        n, ch = (depth - 4) // 6, [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = TradesNetworkBlock(n, ch[0], ch[1], 1)
        self.sub_block1 = TradesNetworkBlock(n, ch[0], ch[1], 1)   # defined, never called
        self.block2 = TradesNetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = TradesNetworkBlock(n, ch[2], ch[3], 2)
        self.bn1, self.relu = nn.BatchNorm2d(ch[3]), nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(self.relu(self.bn1(out)), 8)   # 32x32 inputs only, as in the original
        return self.fc(out.view(-1, self.nChannels))


class PreActBlock(nn.Module):
    def __init__(self, cin, planes, stride, shortcut_from_x):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.from_x = shortcut_from_x
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(x if self.from_x else out) if hasattr(self, "shortcut") else x
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + shortcut


class PreActResNet18(nn.Module):
    """fast_adversarial (shortcut from x, final bn) or kuangliu (from relu(bn1(x)), no final BN)."""

    def __init__(self, num_classes, shortcut_from_x, final_bn):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        cin, layers = 64, []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(PreActBlock(cin, planes, stride, shortcut_from_x),
                                        PreActBlock(planes, planes, 1, shortcut_from_x)))
            cin = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        if final_bn:
            self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def features(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        if hasattr(self, "bn"):
            out = F.relu(self.bn(out))
        return F.avg_pool2d(out, 4).view(out.size(0), -1)

    def forward(self, x):
        return self.linear(self.features(x))


class Normalized(nn.Module):
    """What the repositories' scripts feed their model: (x - mean) / std, outside it."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


# --- random weights, saved the repositories' ways ------------------------------------------


def _images32(per_class=5):
    x, y = make_arrays(per_class=per_class)
    return np.clip(np.repeat(np.repeat(x, 4, axis=2), 4, axis=3), 0, 1).astype(np.float32), y


def _spread_head(net, x):
    """A random network gives every image the same class; a random head centred on the data's
    features spreads its predictions over the classes, so a wrong same-key form shows."""
    with torch.no_grad():
        f = net.model.features((x - net.mean) / net.std)
        g = torch.Generator().manual_seed(1)
        # logits of spread ~3: (f - mean f) has per-image norm ~ std * sqrt(D)
        scale = 3 / (float((f - f.mean(0)).std()) * f.shape[1] ** 0.5)
        w = torch.randn(NUM_CLASSES, f.shape[1], generator=g) * scale
        net.model.linear.weight.copy_(w)
        net.model.linear.bias.copy_(-w @ f.mean(0))
    return net


def _amp_o2(state):
    """apex amp O2: convolutions and linear layers in float16, BatchNorm in float32."""
    return {k: (v.half() if v.ndim in (2, 4) else v) for k, v in state.items()}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    x, y = _images32()
    np.savez(root / "tiny32.npz", x_train=x, y_train=y, x_test=x, y_test=y, class_names=np.array(CLASSES))
    xt = torch.from_numpy(x)

    torch.manual_seed(0)
    wrn = randomise_batchnorm(TradesWideResNet(depth=10, num_classes=NUM_CLASSES, widen_factor=1))
    torch.save(wrn.state_dict(), root / "trades_wrn.pt")                          # TRADES, MART
    torch.save(nn.DataParallel(wrn).state_dict(), root / "awp_wrn.pt")            # TRADES-AWP
    optimizer = torch.optim.SGD(wrn.parameters(), lr=0.1, momentum=0.9)
    wrn(xt[:2]).sum().backward()  # a real optimizer state (momentum buffers) in the checkpoint
    optimizer.step()
    wrn.eval()
    torch.save({"model": wrn.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 300},
               root / "absld_wrn.pth")                                              # ABSLD

    files = {}
    for name, from_x, final_bn, std in (("fast", True, True, CIFAR10_STD), ("kuangliu", False, False, KUANGLIU_STD)):
        torch.manual_seed(1)
        net = Normalized(randomise_batchnorm(PreActResNet18(NUM_CLASSES, from_x, final_bn)), CIFAR10_MEAN, std).eval()
        _spread_head(net, xt)
        if name == "fast":
            state = _amp_o2(net.model.state_dict())
            torch.save(state, root / "fast_model.pth")
        else:
            state = nn.DataParallel(net.model).state_dict()
            torch.save({"net": state, "acc": 87.5, "epoch": 199}, root / "kuangliu_ckpt.pth")
            state = net.model.state_dict()
        net.model.load_state_dict({k: v.float() for k, v in state.items()})  # as the script evaluates it
        with torch.no_grad():
            logits = net(xt)
        labels = logits.argmax(1).numpy()
        # Labelled by the network itself (a trained model's labels), so the right form is decisive.
        # Every top-2 margin is far above the rounding between two graphs of the same weights,
        # so robaudit's argmax equals these labels exactly (clean accuracy 1.0 below).
        top2 = logits.topk(2, dim=1).values
        assert float((top2[:, 0] - top2[:, 1]).min()) > 10 * logit_tolerance(logits)
        np.savez(root / f"{name}_labelled.npz", x_test=x, y_test=labels, class_names=np.array(CLASSES))
        files[name] = net
        files[f"{name}_logits"] = logits
    files["x"], files["y"], files["root"] = xt, torch.from_numpy(y), root
    return files


def _results(out):
    return json.loads((out / "results.json").read_text())


def _one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("robaudit: error: "), stderr
    return lines[0]


# --- WideResNet-34-10 family ---------------------------------------------------------------


def test_the_real_wrn_34_10_key_layout_is_inferred_on_the_meta_device():
    with torch.device("meta"):
        state = TradesWideResNet(depth=34, num_classes=10, widen_factor=10).state_dict()
    # 4 groups (sub_block1 included) of 5 blocks, the last 640 channels wide.
    assert len(state) == 252 and tuple(state["block3.layer.4.conv2.weight"].shape) == (640, 640, 3, 3)
    exact = [f.name for f in arch_inference.fits_for(state) if f.exact]
    assert exact == ["wrn-34-10"]
    # Code without the unused sub_block1 (robust_overfitting, RobustBench wide_resnet.py).
    trimmed = {k: v for k, v in state.items() if not k.startswith("sub_block1.")}
    assert [f.name for f in arch_inference.fits_for(trimmed) if f.exact] == ["wrn-34-10"]


@pytest.mark.parametrize("filename,saved_as", [
    ("trades_wrn.pt", "state_dict"), ("awp_wrn.pt", "state_dict"), ("absld_wrn.pth", "checkpoint")])
def test_scan_infers_a_trades_style_wide_resnet(published, filename, saved_as, tmp_path, capsys):
    root, out = published["root"], tmp_path / "out"
    code, _, stderr = run_cli(capsys, "scan", root / filename, "--dataset", root / "tiny32.npz", "--out", out, *SCAN)
    assert code == 0, stderr
    assert "no --arch given: the weights are wrn-10-1" in stderr
    model = _results(out)["model"]
    assert model["arch"] == "wrn-10-1" and model["format"] == saved_as
    assert model["arch_inferred"] == {"how": "matched keys and shapes", "candidates": ["wrn-10-1"]}
    assert model["adaptations"]["normalize"] is None   # TRADES feeds [0, 1] images
    if filename == "awp_wrn.pt":
        assert any("'module.' prefix" in n for n in model["adaptations"]["notes"])
    loaded = load_model(root / filename, num_classes=NUM_CLASSES)
    with torch.no_grad():
        logits = loaded.module(published["x"])
    expected = _reference_wrn_logits(root / filename, published["x"])
    assert_logits_close(logits, expected, msg=filename)
    assert float((expected - expected.mean(0)).abs().max()) > 1e-2   # images are told apart
    clean_pred = np.load(out / "samples.npz")["clean_pred"]
    assert_is_argmax(expected, clean_pred)


def _reference_wrn_logits(path, x):
    """The original class with the file's weights, loaded as the repository loads them."""
    obj = torch.load(path, weights_only=True)
    state = obj["model"] if "model" in obj else obj
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = TradesWideResNet(depth=10, num_classes=NUM_CLASSES, widen_factor=1)
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(x)


# --- PreAct ResNet-18: same keys, different forwards ---------------------------------------

PREACT = {  # replica: (file, --arch it must be inferred as, its same-key twin, --mean, --std)
    "fast": ("fast_model.pth", "preactresnet18-fast", "preactresnet18", CIFAR10_MEAN, CIFAR10_STD),
    "kuangliu": ("kuangliu_ckpt.pth", "preactresnet18-kuangliu", "preactresnet18-robustbench",
                 CIFAR10_MEAN, KUANGLIU_STD),
}


def _floats(values):
    return ",".join(str(v) for v in values)


@pytest.mark.parametrize("name", sorted(PREACT))
def test_a_preact_file_is_inferred_when_the_probe_decides(published, name, tmp_path, capsys):
    filename, arch, twin, mean, std = PREACT[name]
    root, out = published["root"], tmp_path / "out"
    code, _, stderr = run_cli(capsys, "scan", root / filename, "--dataset", root / f"{name}_labelled.npz",
                              "--mean", _floats(mean), "--std", _floats(std), "--out", out, *SCAN)
    assert code == 0, stderr
    assert f"no --arch given: the weights are {arch}" in stderr
    results = _results(out)
    model = results["model"]
    assert model["arch"] == arch
    inferred = model["arch_inferred"]
    assert sorted(inferred["candidates"]) == sorted([arch, twin]) and "probe" in inferred["how"]
    accuracy = inferred["probe"]["accuracy"]
    assert inferred["probe"]["n"] == len(published["y"]) and accuracy[arch] == 1.0
    assert accuracy[twin] <= 1.0 - arch_inference.DECISIVE_MARGIN
    assert results["attacks"]["clean"]["avg"] == pytest.approx(1.0)
    assert model["adaptations"]["normalize"] == {"mean": pytest.approx(list(mean)), "std": pytest.approx(list(std))}
    # The audited network is the original class: its logits, through the recorded boundary.
    loaded = load_model(root / filename, arch=arch, num_classes=NUM_CLASSES, mean=list(mean), std=list(std))
    with torch.no_grad():
        assert_logits_close(loaded.module(published["x"]), published[f"{name}_logits"], msg=name)


@pytest.mark.parametrize("name", sorted(PREACT))
def test_a_preact_file_without_a_decisive_probe_is_refused_naming_both_forms(published, name, tmp_path, capsys):
    filename, arch, twin, mean, std = PREACT[name]
    root, out = published["root"], tmp_path / "out"
    # tiny32.npz's labels have nothing to do with these random networks: no form wins.
    code, _, stderr = run_cli(capsys, "scan", root / filename, "--dataset", root / "tiny32.npz",
                              "--mean", _floats(mean), "--std", _floats(std), "--out", out, *SCAN)
    assert code == 2
    line = _one_error_line(stderr)
    assert "does not decide between them" in line
    assert f"--arch {arch}" in line and f"--arch {twin}" in line
    assert not out.exists()


# --- the design card: a TRADES teacher distilled into the CIFAR MobileNetV2 ----------------


def _cifar_mobilenetv2_params():
    from robaudit.audit.models.architectures import create_architecture

    return sum(p.numel() for p in create_architecture("mobilenetv2", NUM_CLASSES).parameters())


def test_remediate_distills_a_trades_state_dict_teacher_as_the_design_card_writes_it(
        published, tmp_path, capsys, monkeypatch):
    import robaudit.remediate.train as train
    from robaudit.remediate.export import export_student

    # The student is exported as TorchScript only: torch.export and ONNX of a MobileNetV2 take
    # ~25 s on 2 CPU cores and are tested in test_remediate_train.py; this test is about the teacher.
    monkeypatch.setattr(train, "export_student",
                        lambda module, example, out_dir, formats: export_student(module, example, out_dir,
                                                                                 ("torchscript",)))
    root, out = published["root"], tmp_path / "absld"
    code, _, stderr = run_cli(capsys, "remediate", "--teacher", root / "trades_wrn.pt", "--student", "mobilenetv2",
                              "--dataset", root / "tiny32.npz", "--epochs", 1, "--batch-size", 16,
                              "--val-per-class", 0, "--steps", 1, "--audit-attacks", "clean", "--device", "cpu",
                              "--threads", 1, "--out", out)
    assert code == 0, stderr
    teacher = _results(out / "teacher")["model"]
    assert teacher["arch"] == "wrn-10-1" and teacher["format"] == "state_dict"
    assert teacher["arch_inferred"] == {"how": "matched keys and shapes", "candidates": ["wrn-10-1"]}
    assert any("architecture wrn-10-1 inferred" in n for n in teacher["adaptations"]["notes"])
    student = _results(out / "student")
    assert student["training"]["options"]["student"] == "mobilenetv2"
    # The CIFAR form's parameter count (torchvision's mobilenet_v2 with 5 classes has 2,230,277).
    assert student["model"]["num_params"] == _cifar_mobilenetv2_params() == 2_290_517


def test_student_mobilenet_v2_is_the_cifar_mobilenetv2_and_says_so(tmp_path):
    from robaudit.remediate.common import RemediateConfig, build_student, student_architecture

    cfg = RemediateConfig(out_dir=tmp_path, student="mobilenet_v2")
    module, description = build_student(cfg, NUM_CLASSES, torch.device("cpu"))
    assert description == "mobilenet_v2"
    assert sum(p.numel() for p in module.parameters()) == _cifar_mobilenetv2_params()
    assert module.conv1.stride == (1, 1)   # the CIFAR stem (torchvision's has stride 2)
    arch, note = student_architecture(cfg)   # what the CLI prints once and training_block records
    assert arch == "mobilenetv2" and "mobilenet_v2 -> mobilenetv2 (CIFAR form" in note
    assert "torchvision:mobilenet_v2" in note
    arch, note = student_architecture(RemediateConfig(out_dir=tmp_path, student="mobilenetv2"))
    assert arch == "mobilenetv2" and "torchvision:mobilenet_v2" in note   # recorded; the CLI prints aliases only
