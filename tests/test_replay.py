"""Replay of counted failures on the artifact (audit/replay.py, issue 24 item 1).

The injected disagreement: the attacked module is the nearest-centroid model of
test_engine, the artifact an ONNX file of the same model with +1e6 on class 0's logit
away from the audited clean images, so onnxruntime agrees on the clean images and calls
every perturbed image class 0. Each failure the attack finds on a class-0 point
is then unconfirmed (the artifact still says 0), every other failure is confirmed (the
artifact says 0, not the label): exact expectations, whatever the attack found.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from robaudit.audit import replay as replay_mod
from robaudit.audit.models.loading import LoadedModel

from test_engine import C, Centroid, load_samples, make_data, scan


class BoostClass0(nn.Module):
    """The centroid model on the audited clean images; +1e6 on class 0 anywhere else (every
    perturbed image), so clean predictions agree with the attacked module and failures do not."""

    def __init__(self):
        super().__init__()
        self.inner = Centroid()
        self.register_buffer("clean", make_data().x.flatten(1))

    def forward(self, x):
        distance = ((x.flatten(1)[:, None, :] - self.clean[None]) ** 2).sum(-1).amin(1)
        off_clean = (distance > 1e-10).float()[:, None]
        return self.inner(x) + off_clean * torch.tensor([1e6] + [0.0] * (C - 1))


@pytest.fixture(scope="module")
def boosted_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("replay") / "boosted.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(BoostClass0().eval(), (torch.rand(2, 3, 8, 8),), str(path), dynamo=False,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    return str(path)


def _onnx_model(path) -> LoadedModel:
    """Attacks run on Centroid; the artifact (the ONNX file) disagrees with it."""
    return LoadedModel(module=Centroid(), format="onnx", path=path, sha256="boosted", num_params=15,
                       arch=None, white_box=True, refusal=None,
                       adaptations={"normalize": None, "onnx": None, "notes": [], "output": {"name": "logits"}})


def test_unconfirmed_failures_count_as_robust_and_are_flagged(tmp_path, boosted_onnx):
    plain = scan(tmp_path / "plain", attacks=["clean", "pgd"], replay=False, write_evidence=False)
    replayed = scan(tmp_path / "replayed", attacks=["clean", "pgd"], model=_onnx_model(boosted_onnx))
    y = make_data().y.numpy()
    clean_correct = np.array([c["correct"] for c in plain["attacks"]["clean"]["per_class"]])
    pgd_correct = np.array([c["correct"] for c in plain["attacks"]["pgd"]["per_class"]])
    failures = clean_correct - pgd_correct          # per class, found by the attack
    assert failures[0] > 0 and failures[1:].sum() > 0, "the fixture must give failures in class 0 and others"
    rep = replayed["attacks"]["pgd"]["replay"]
    assert rep["runtime"].startswith("onnxruntime")
    assert rep["unconfirmed"] == [int(failures[0])] + [0] * (C - 1)
    assert rep["confirmed"] == [0] + failures[1:].tolist()
    correct = [c["correct"] for c in replayed["attacks"]["pgd"]["per_class"]]
    assert correct[0] == clean_correct[0]                 # class 0: every failure unconfirmed -> robust
    assert correct[1:] == pgd_correct[1:].tolist()
    assert replayed["attacks"]["clean"]["replay"] is None
    flags = {f["id"]: f for f in replayed["checks"]}
    assert "replay_unconfirmed" in flags and f"pgd: {failures[0]}" in flags["replay_unconfirmed"]["message"]
    assert "replay_unconfirmed" not in {f["id"] for f in plain["checks"]}
    samples = load_samples(tmp_path / "replayed")
    # confirmed failures take the artifact's prediction (class 0)
    fooled = ~samples["robust_pgd"] & (samples["clean_pred"] == y)
    assert fooled.sum() == failures[1:].sum() and (samples["adv_pred_pgd"][fooled] == 0).all()


def test_replay_on_the_same_program_confirms_every_failure(tmp_path):
    plain = scan(tmp_path / "a", attacks=["clean", "fgsm", "pgd"], replay=False, write_evidence=False)
    replayed = scan(tmp_path / "b", attacks=["clean", "fgsm", "pgd"])
    for name in ("fgsm", "pgd"):
        assert [c["correct"] for c in plain["attacks"][name]["per_class"]] == \
            [c["correct"] for c in replayed["attacks"][name]["per_class"]]
        rep = replayed["attacks"][name]["replay"]
        assert sum(rep["unconfirmed"]) == 0 and sum(rep["confirmed"]) > 0
        assert all(r <= c for r, c in zip(rep["realizable"], rep["confirmed"]))


def test_resumed_scan_keeps_the_replay(tmp_path):
    first = scan(tmp_path / "o", attacks=["clean", "pgd"])
    evidence = (tmp_path / "o" / "evidence.npz").read_bytes()
    again = scan(tmp_path / "o", attacks=["clean", "pgd"])   # every chunk reused from the state
    assert again["attacks"]["pgd"]["replay"] == first["attacks"]["pgd"]["replay"]
    with np.load(tmp_path / "o" / "evidence.npz") as f, np.load(__import__("io").BytesIO(evidence)) as g:
        for key in f.files:
            if key != "manifest":
                assert np.array_equal(f[key], g[key]), key


def test_quantize_stays_in_the_linf_ball_and_on_the_grid():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 4, 4, generator=gen)                     # off the 8-bit grid
    eps = 8 / 255
    x_adv = (x + eps * torch.sign(torch.randn(x.shape, generator=gen))).clamp(0, 1)
    q, ok = replay_mod.quantize(x, x_adv, eps, "linf")
    image = replay_mod.as_image(q)
    assert ok.all()
    assert ((image - x).abs() <= eps + 1e-6).all()                # the step back toward x keeps the ball
    assert (torch.round(image * 255) == q.float()).all()
    plain = torch.round(x_adv * 255) / 255                         # plain rounding would leave it
    assert ((plain - x).abs() > eps + 1e-6).any()


def test_quantize_l2_rounds_toward_clean_when_rounding_leaves_the_ball():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(32, 3, 4, 4, generator=gen)
    eps = 0.05
    d = torch.randn(x.shape, generator=gen)
    x_adv = (x + eps * d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1)
    q, ok = replay_mod.quantize(x, x_adv, eps, "l2")
    norms = (replay_mod.as_image(q).double() - x.double()).flatten(1).norm(dim=1)
    assert (norms[ok] <= eps + 1e-6).all()
    assert torch.equal(ok, replay_mod.in_ball(x, replay_mod.as_image(q), eps, "l2"))


def test_predict_recomposes_batches_and_keeps_order():
    calls = []

    class Record(nn.Module):
        def forward(self, x):
            calls.append(len(x))
            return x.flatten(1)

    x = torch.eye(10).view(10, 10, 1, 1)[torch.randperm(10, generator=torch.Generator().manual_seed(0))]
    pred = replay_mod.predict(Record(), x, batch_size=10)
    assert torch.equal(pred, x.flatten(1).argmax(1))
    assert calls == [6, 4]                                       # not the attack's batch of 10


def test_fmn_norm_counts_only_once_confirmed(tmp_path, boosted_onnx):
    """Class-0 points FMN fooled within eps are unconfirmed on the artifact: their minimal
    norm becomes +inf (never fooled); every other norm is the float one, confirmed."""
    plain = scan(tmp_path / "plain", attacks=["clean", "fmn"], replay=False, write_evidence=False)
    replayed = scan(tmp_path / "replayed", attacks=["clean", "fmn"], model=_onnx_model(boosted_onnx))
    a, b = load_samples(tmp_path / "plain"), load_samples(tmp_path / "replayed")
    eps = plain["config"]["eps"]
    y = a["y"]
    within = (a["clean_pred"] == y) & (a["min_norm_fmn"] <= eps)
    assert within[y == 0].any() and within[y != 0].any()
    assert np.isinf(b["min_norm_fmn"][within & (y == 0)]).all()
    assert np.array_equal(b["min_norm_fmn"][~(within & (y == 0))], a["min_norm_fmn"][~(within & (y == 0))])
    gained = int((within & (y == 0)).sum())
    assert replayed["curves"]["fmn"]["not_found"][0] == plain["curves"]["fmn"]["not_found"][0] + gained


class AlwaysClass0(nn.Module):
    def forward(self, x):
        return Centroid()(x) * 0 + torch.tensor([1.0] + [0.0] * (C - 1))


def test_clean_predictions_come_from_the_artifact(tmp_path):
    """The attacked module (Centroid) is mostly right; the ONNX artifact says class 0 for
    everything: the clean block is the artifact's, and only class-0 points are attacked."""
    path = tmp_path / "zero.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(AlwaysClass0().eval(), (torch.rand(2, 3, 8, 8),), str(path), dynamo=False,
                          input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    results = scan(tmp_path / "o", attacks=["clean", "pgd"], model=_onnx_model(str(path)))
    n = [c["n"] for c in results["attacks"]["clean"]["per_class"]]
    assert [c["correct"] for c in results["attacks"]["clean"]["per_class"]] == [n[0]] + [0] * (C - 1)
    assert results["attacks"]["pgd"]["n_attacked"] == n[0]
