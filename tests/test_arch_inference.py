"""Architecture inference for weights-only files (audit/models/arch_inference.py, issue 16).

Matching only reads keys and shapes, so the registry-wide test uses meta-device state_dicts
(the shapes a random-weight state_dict of that architecture has, without allocating a
WRN-70-16); files with real random weights, saved the ways the repositories save them,
go through load_model and the CLI. Everything runs on tiny synthetic data.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from robaudit.audit.models import arch_inference
from robaudit.audit.models.architectures import ARCHITECTURES, PREACT_RESNET18_FORMS, SmallCNN, create_architecture
from robaudit.audit.metrics import binomial_upper_tail, mcnemar_exact_p
from robaudit.audit.models.loading import load_model
from robaudit.cli import main
from robaudit.errors import UserError

from conftest import assert_logits_close, randomise_batchnorm

PREACT_TWINS = {"preactresnet18": "preactresnet18-fast", "preactresnet18-fast": "preactresnet18",
                "preactresnet18-kuangliu": "preactresnet18-robustbench",
                "preactresnet18-robustbench": "preactresnet18-kuangliu"}
# Every registered name but the PreAct forms (which come in same-key pairs, tested below),
# and unlisted WideResNet sizes, which are read off the shapes.
INFERABLE = [n for n in ARCHITECTURES.names() if n not in PREACT_TWINS] + ["wrn-16-2", "wrn-40-4", "dm-wrn-22-1"]
CIFAR10_MEAN, CIFAR10_STD = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]


def _meta_state(name, num_classes):
    with torch.device("meta"):
        return create_architecture(name, num_classes=num_classes).state_dict()


def _error(*args, **kwargs) -> str:
    with pytest.raises(UserError) as err:
        load_model(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


# --- keys and shapes ---------------------------------------------------------------------


@pytest.mark.parametrize("name", INFERABLE)
def test_every_registered_architecture_is_inferred_as_itself(name):
    exact = [f for f in arch_inference.fits_for(_meta_state(name, 7), num_classes=10) if f.exact]
    assert [f.name for f in exact] == [name]
    assert exact[0].num_classes == 7  # from the head's shape, not the hint


@pytest.mark.parametrize("name", sorted(PREACT_TWINS))
def test_preact_forms_match_exactly_their_same_key_twin(name):
    exact = {f.name for f in arch_inference.fits_for(_meta_state(name, 10)) if f.exact}
    assert exact == {name, PREACT_TWINS[name]}
    assert set(PREACT_TWINS) == set(PREACT_RESNET18_FORMS)


def _save(state, path, how):
    """Saved as the repositories do: plain, under "state_dict", with DataParallel's prefix."""
    if how in ("module.", "checkpoint+module."):
        state = {f"module.{k}": v for k, v in state.items()}
    if how.startswith("checkpoint"):
        state = {"state_dict": state, "epoch": 3}
    if how == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("name,how,hw", [
    ("wrn-16-2", "plain", 8), ("smallcnn", "checkpoint+module.", 8), ("mobilenetv2", "module.", 8),
    ("dm-wrn-10-1", "safetensors", 32)])
def test_a_saved_file_loads_into_the_inferred_architecture(name, how, hw, tmp_path):
    torch.manual_seed(0)
    model = randomise_batchnorm(create_architecture(name, num_classes=5))
    path = _save(model.state_dict(), tmp_path / "weights.bin", how)
    loaded = load_model(path, num_classes=5, input_shape=(3, hw, hw))
    assert loaded.arch == name
    assert loaded.arch_inferred == {"how": "matched keys and shapes", "candidates": [name]}
    notes = loaded.adaptations["notes"]
    assert any(f"architecture {name} inferred" in n for n in notes), notes
    if name == "mobilenetv2":  # the resolver's note says which mobilenet this is
        assert any("CIFAR form" in n and "torchvision:mobilenet_v2" in n for n in notes), notes
    x = torch.rand(3, 3, hw, hw)
    with torch.no_grad():
        assert_logits_close(loaded.module(x), model(x))


def test_weights_matching_nothing_are_refused_naming_the_closest(tmp_path):
    state = create_architecture("wrn-10-1").state_dict()
    state["fc.weight"] = torch.zeros(10, 32)  # the head sees 64 features in wrn-10-1
    message = _error(_save(state, tmp_path / "odd.pt", "plain"))
    assert message.startswith(f"{tmp_path / 'odd.pt'} holds only weights (state_dict)")
    assert "match no registered architecture" in message and "--arch" in message
    assert "closest: wrn-10-1 (1 mismatched keys)" in message


def test_arch_still_wins_and_is_checked_the_same_way(tmp_path):
    path = _save(create_architecture("wrn-10-1").state_dict(), tmp_path / "w.pt", "plain")
    assert "do not match arch 'resnet18'" in _error(path, arch="resnet18")
    loaded = load_model(path, arch="WRN_10_1", input_shape=(3, 8, 8))
    assert loaded.arch == "wrn-10-1" and loaded.arch_inferred is None


# --- same keys, different forwards: the PreAct shortcut forms -------------------------------

PROBE_N, PROBE_HW = 32, 16


@pytest.fixture(scope="module")
def preact(tmp_path_factory):
    """One random-weight PreAct ResNet-18 file, and both forms' predictions on probe images."""
    torch.manual_seed(0)
    rice = randomise_batchnorm(create_architecture("preactresnet18"))
    fast = create_architecture("preactresnet18-fast")
    fast.load_state_dict(rice.state_dict())
    fast.eval()
    path = tmp_path_factory.mktemp("preact") / "preact.pt"
    torch.save(rice.state_dict(), path)
    x = torch.rand(PROBE_N, 3, PROBE_HW, PROBE_HW, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return {"path": str(path), "x": x, "rice": rice(x).argmax(1), "fast": fast(x).argmax(1),
                "fast_model": fast}


def _load_preact(preact, **kwargs):
    return load_model(preact["path"], num_classes=10, input_shape=(3, PROBE_HW, PROBE_HW), **kwargs)


def test_same_key_forms_without_a_probe_are_refused_naming_both(preact):
    message = _error(preact["path"], num_classes=10, input_shape=(3, PROBE_HW, PROBE_HW))
    assert "fit preactresnet18 and preactresnet18-fast exactly" in message
    assert "--arch preactresnet18 or --arch preactresnet18-fast" in message


def test_a_decisive_probe_picks_the_form_that_classifies_it(preact):
    labels = preact["fast"]  # the fast form gets every probe image right by construction
    other = float((preact["rice"] == labels).float().mean())
    assert other <= 0.5  # ... and the other form really does worse
    loaded = _load_preact(preact, probe_data=(preact["x"], labels))
    assert loaded.arch == "preactresnet18-fast"
    record = loaded.arch_inferred
    assert record["candidates"] == ["preactresnet18", "preactresnet18-fast"]
    assert "probe" in record["how"] and record["probe"]["n"] == PROBE_N
    assert record["probe"]["accuracy"] == {"preactresnet18": round(other, 4), "preactresnet18-fast": 1.0}
    assert any("chosen over preactresnet18" in n for n in loaded.adaptations["notes"])
    with torch.no_grad():
        assert_logits_close(loaded.module(preact["x"][:4]), preact["fast_model"](preact["x"][:4]))


def test_a_tied_probe_is_refused_with_both_accuracies(preact):
    half = PROBE_N // 2  # each form is right on its own half
    labels = torch.cat([preact["rice"][:half], preact["fast"][half:]])
    accuracy = [float((preact[f] == labels).float().mean()) for f in ("rice", "fast")]
    assert abs(accuracy[0] - accuracy[1]) < arch_inference.DECISIVE_MARGIN
    message = _error(preact["path"], num_classes=10, input_shape=(3, PROBE_HW, PROBE_HW),
                     probe_data=(preact["x"], labels))
    assert "does not decide between them" in message
    assert f"preactresnet18 {100 * accuracy[0]:.1f}%" in message
    assert "--arch preactresnet18 or --arch preactresnet18-fast" in message


def test_arch_chooses_among_same_key_forms_with_a_note(preact):
    loaded = _load_preact(preact, arch="preactresnet18")
    assert loaded.arch == "preactresnet18" and loaded.arch_inferred is None
    assert any("also fit preactresnet18-fast" in n for n in loaded.adaptations["notes"])


def _correct(bits):
    return torch.tensor([bool(b) for b in bits])


def test_decisive_needs_margin_significance_and_more_than_chance():
    # 100% vs 0% on 8 images: a big gap, but McNemar's p = 2 / 2^8 = 0.0078.
    assert "McNemar" in arch_inference.decisive_reason(_correct([1] * 8), _correct([0] * 8), 10)
    assert arch_inference.decisive_reason(_correct([1] * 16), _correct([0] * 16), 10) is None
    # 60 vs 55 of 100: under the 10-point margin.
    assert "points" in arch_inference.decisive_reason(_correct([1] * 60 + [0] * 40),
                                                      _correct([1] * 55 + [0] * 45), 10)
    # 30 of 200 (15%) against 0: significant gap, but not clearly above chance (10%).
    assert "chance" in arch_inference.decisive_reason(_correct([1] * 30 + [0] * 170), _correct([0] * 200), 10)
    assert mcnemar_exact_p(5, 5) == 1.0
    assert binomial_upper_tail(0, 10, 0.3) == 1.0
    assert abs(binomial_upper_tail(10, 10, 0.5) - 2 ** -10) < 1e-15


def test_probe_batch_is_deterministic_and_spread():
    x, y = torch.rand(1000, 3, 4, 4), torch.arange(10).repeat_interleave(100)
    px, py = arch_inference.probe_batch(x, y, size=50)
    assert len(py) == 50 and set(py.tolist()) == set(range(10))
    assert torch.equal(px, arch_inference.probe_batch(x, y, size=50)[0])
    assert torch.equal(arch_inference.probe_batch(x[:20], y[:20])[1], y[:20])  # small data: all of it


# --- RobustBench-style mu / sigma buffers ----------------------------------------------------

class NormalisingSmallCNN(SmallCNN):
    """A network that normalises inside with `mu` / `sigma` buffers, as RobustBench's do."""

    def __init__(self, mean, std, shape):
        super().__init__(10)
        self.register_buffer("mu", torch.tensor(mean).view(shape))
        self.register_buffer("sigma", torch.tensor(std).view(shape))

    def forward(self, x):
        return super().forward((x - self.mu.view(1, 3, 1, 1)) / self.sigma.view(1, 3, 1, 1))


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (3,)])
def test_mu_sigma_become_the_boundary_normalisation(shape, tmp_path):
    torch.manual_seed(0)
    model = randomise_batchnorm(NormalisingSmallCNN(CIFAR10_MEAN, CIFAR10_STD, shape))
    path = _save(model.state_dict(), tmp_path / "rb.pt", "plain")
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        expected, unnormalised = model(x), SmallCNN.forward(model, x)
    assert (expected - unnormalised).abs().max() > 1e-2  # so a missed normalisation would show
    for kwargs in ({}, {"arch": "smallcnn"}, {"mean": CIFAR10_MEAN, "std": CIFAR10_STD}):
        loaded = load_model(path, input_shape=(3, 8, 8), **kwargs)
        assert loaded.arch == "smallcnn"
        normalize = loaded.adaptations["normalize"]
        assert normalize["source"] == "the file's mu/sigma buffers"
        assert normalize["mean"] == pytest.approx(CIFAR10_MEAN) and normalize["std"] == pytest.approx(CIFAR10_STD)
        assert any("mu/sigma buffers" in step for step in loaded.adaptations["pipeline"])
        with torch.no_grad():
            assert_logits_close(loaded.module(x), expected, msg=str(kwargs))  # normalised once


def test_mu_sigma_disagreeing_with_mean_std_are_refused(tmp_path):
    model = NormalisingSmallCNN(CIFAR10_MEAN, CIFAR10_STD, (1, 3, 1, 1))
    path = _save(model.state_dict(), tmp_path / "rb.pt", "plain")
    message = _error(path, input_shape=(3, 8, 8), mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    assert "disagree with the normalisation" in message and "mu/sigma" in message


def test_a_model_that_normalises_itself_is_not_normalised_twice(tmp_path):
    torch.manual_seed(0)
    model = randomise_batchnorm(create_architecture("dm-wrn-10-1"))
    own = dict(model.state_dict(), mu=torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1),
               sigma=torch.tensor(CIFAR10_STD).view(1, 3, 1, 1))
    loaded = load_model(_save(own, tmp_path / "dm.pt", "plain"))
    assert loaded.arch == "dm-wrn-10-1" and loaded.adaptations["normalize"] is None
    assert any("applied once, inside the model" in n for n in loaded.adaptations["notes"])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert_logits_close(loaded.module(x), model(x))
    other = dict(own, mu=torch.full((1, 3, 1, 1), 0.5))
    assert "normalises its own input" in _error(_save(other, tmp_path / "dm2.pt", "plain"))


def _dm_file(tmp_path):
    """A DM WideResNet (normalises its own input with the CIFAR-10 constants), saved plain."""
    torch.manual_seed(0)
    model = randomise_batchnorm(create_architecture("dm-wrn-10-1"))
    return model, _save(model.state_dict(), tmp_path / "dm.pt", "plain")


def test_mean_std_equal_to_a_models_own_normalisation_are_applied_once(tmp_path):
    model, path = _dm_file(tmp_path)
    x = torch.rand(4, 3, 32, 32)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected, twice = model(x), model((x - mean) / std)
    assert (expected - twice).abs().max() > 0.1   # so normalising twice would show
    for arch in (None, "dm-wrn-10-1"):
        loaded = load_model(path, arch=arch, mean=CIFAR10_MEAN, std=CIFAR10_STD)
        assert loaded.arch == "dm-wrn-10-1"
        assert loaded.adaptations["normalize"] is None   # not at the boundary ...
        assert not any("(x - mean) / std" in step for step in loaded.adaptations["pipeline"])
        notes = [n for n in loaded.adaptations["notes"] if "equal the model's own input normalisation" in n]
        assert len(notes) == 1 and "applied once, inside the model" in notes[0], loaded.adaptations["notes"]
        assert "mean [0.4914, 0.4822, 0.4465]" in notes[0]
        with torch.no_grad():
            assert_logits_close(loaded.module(x), expected, msg=str(arch))   # ... but inside, once


@pytest.mark.parametrize("mean,std", [([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]), ([0.4914], [0.2471]),
                                      (CIFAR10_MEAN, [0.2023, 0.1994, 0.2010])])
def test_mean_std_other_than_a_models_own_normalisation_are_refused(mean, std, tmp_path):
    _, path = _dm_file(tmp_path)
    message = _error(path, mean=mean, std=std)
    assert message.startswith("the weights (dm-wrn-10-1) normalise their input themselves "
                              "(mean [0.4914, 0.4822, 0.4465], std [0.2471, 0.2435, 0.2616])"), message
    assert message.endswith("would normalise it a second time: drop --mean/--std")


def test_scan_refuses_mean_std_for_a_model_that_normalises_itself_in_one_line(tmp_path, capsys):
    _, path = _dm_file(tmp_path)
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    np.savez(tmp_path / "d32.npz", x_test=x, y_test=np.arange(4) % 10)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["scan", path, "--dataset", str(tmp_path / "d32.npz"), "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5",
              "--out", str(out), "--device", "cpu", "--attacks", "clean", "--no-report"])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robaudit: error: the weights (dm-wrn-10-1) normalise")
    assert "drop --mean/--std" in lines[0] and not out.exists()


# --- the command line ----------------------------------------------------------------------


def test_scan_infers_a_trades_wide_resnet_and_records_how(tmp_path, capsys):
    torch.manual_seed(0)
    classes = ["a", "b", "c", "d"]
    x = np.random.default_rng(0).random((8, 3, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "tiny.npz", x_test=x, y_test=np.arange(8) % 4, class_names=np.array(classes))
    # TRADES saves model.state_dict() of its WideResNet (sub_block1 included).
    torch.save(create_architecture("wrn-10-1", num_classes=4).state_dict(), tmp_path / "trades.pt")
    out = tmp_path / "out"
    try:
        main(["scan", str(tmp_path / "trades.pt"), "--dataset", str(tmp_path / "tiny.npz"), "--out", str(out),
              "--device", "cpu", "--attacks", "clean", "--no-report"])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    stderr = capsys.readouterr().err
    assert code == 0, stderr
    assert "no --arch given: the weights are wrn-10-1" in stderr
    model = json.loads((out / "results.json").read_text())["model"]
    assert model["arch"] == "wrn-10-1" and model["format"] == "state_dict"
    assert model["arch_inferred"] == {"how": "matched keys and shapes", "candidates": ["wrn-10-1"]}
