"""The evidence file (audit/evidence.py): its digests recomputed with numpy, its images
reconstructed and re-scored, its self-check, and the float32 fallback of the replay."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from torch import nn

from robaudit.audit import evidence as evidence_mod
from robaudit.audit import replay as replay_mod
from robaudit.errors import UserError

from test_engine import Centroid, make_data, scan


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    out = tmp_path_factory.mktemp("evidence")
    results = scan(out, attacks=["clean", "fgsm", "pgd"])
    return out, results


def test_digests_recompute_with_numpy(scanned):
    out, results = scanned
    ev = evidence_mod.read(out / "evidence.npz")
    man = ev.manifest
    data = make_data()
    x, y = data.x.numpy(), data.y.numpy()
    assert man["data_sha256"] == hashlib.sha256(np.ascontiguousarray(x, "<f4").tobytes()
                                                + y.astype("<i8").tobytes()).hexdigest()
    assert man["results_sha256"] == hashlib.sha256((out / "results.json").read_bytes()).hexdigest()
    assert man["config_sha256"] == hashlib.sha256(
        json.dumps(results["config"], sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert man["model_sha256"] == results["model"]["sha256"]
    assert set(man["attacks"]) == {"fgsm", "pgd"}


def test_every_stored_failure_fools_the_model_inside_the_ball(scanned):
    out, results = scanned
    ev = evidence_mod.read(out / "evidence.npz")
    data = make_data()
    for name in ("fgsm", "pgd"):
        part = ev.attack(name)
        pos = part["position"]
        assert len(pos) == sum(results["attacks"][name]["replay"]["confirmed"]) > 0
        assert np.array_equal(part["label"], data.y.numpy()[pos]) and np.array_equal(part["index"], pos)
        clean = data.x[torch.from_numpy(pos)]
        images = ev.images(name, clean)
        assert (images - clean).abs().amax() <= results["config"]["eps"] + 1e-6
        assert images.min() >= 0 and images.max() <= 1
        with torch.no_grad():
            pred = Centroid()(images).argmax(1).numpy()
        assert (pred != part["label"]).all() and np.array_equal(pred, part["pred"])
        on_grid = (torch.round(images * 255) / 255 == images).flatten(1).all(1).numpy()
        realizable = np.bincount(part["label"][on_grid], minlength=len(data.classes)).tolist()
        assert realizable == results["attacks"][name]["replay"]["realizable"]
        assert (part["kind"] == replay_mod.KIND_DELTA8).sum() == len(part["delta8"])


def test_edited_array_is_detected(scanned, tmp_path):
    out, _ = scanned
    with np.load(out / "evidence.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays["fgsm__index"] = arrays["fgsm__index"] + 1
    np.savez_compressed(tmp_path / "e.npz", **arrays)
    with pytest.raises(UserError, match="payload_sha256"):
        evidence_mod.read(tmp_path / "e.npz")
    (tmp_path / "t.npz").write_bytes((out / "evidence.npz").read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated or edited"):
        evidence_mod.read(tmp_path / "t.npz")
    np.savez(tmp_path / "foreign.npz", a=np.zeros(3))
    with pytest.raises(UserError, match="no robaudit evidence manifest"):
        evidence_mod.read(tmp_path / "foreign.npz")


def test_no_evidence_writes_none(tmp_path):
    scan(tmp_path, attacks=["clean", "fgsm"], write_evidence=False)
    assert (tmp_path / "results.json").exists() and not (tmp_path / "evidence.npz").exists()


def test_an_evidence_file_too_large_to_mail_is_said(tmp_path, monkeypatch, caplog):
    """The scan writes the file anyway (it is the proof) and says in one line that it is over
    what mail servers take; below the limit it says nothing."""
    scan(tmp_path / "small", attacks=["clean", "fgsm"])
    assert not [r for r in caplog.records if "mail servers" in r.getMessage()]
    monkeypatch.setattr(evidence_mod, "MAIL_LIMIT_BYTES", 100)
    scan(tmp_path / "large", attacks=["clean", "fgsm"])
    said = [r.getMessage() for r in caplog.records if "mail servers" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("evidence.npz is ")
    assert (tmp_path / "large" / "evidence.npz").stat().st_size > 100


class OffGrid(nn.Module):
    """Class 1 when any pixel is off the 8-bit grid, else class 0."""

    def forward(self, x):
        off = (x * 255 - torch.round(x * 255)).abs().flatten(1).amax(1)
        return torch.stack([torch.full_like(off, 1e-3), 1e3 * off], 1)


def test_float32_kept_where_rounding_loses_the_failure():
    x = torch.full((3, 1, 2, 2), 100 / 255)
    x_adv = x.clone()
    x_adv[0] += 0.3 / 255         # fools only off the grid: stored float32, not realizable
    x_adv[1] += 1 / 255           # on the grid: fools neither way -> unconfirmed
    x_adv[2] += 0.6 / 255         # rounds to +1/255 (no longer fools): float32 again
    replayer = replay_mod.Replayer(OffGrid(), "test", eps=1 / 255, norm="linf", batch_size=4)
    y = torch.zeros(3, dtype=torch.long)
    record = replayer.chunk_record(x, x_adv, y, np.array([True, True, True]), np.arange(3), {})
    kind = record[replay_mod.PREFIX + "kind"].tolist()
    assert kind == [replay_mod.KIND_FLOAT32, replay_mod.KIND_UNCONFIRMED, replay_mod.KIND_FLOAT32]
    assert record[replay_mod.PREFIX + "realizable"].tolist() == [False, False, False]
    assert torch.equal(torch.from_numpy(record[replay_mod.PREFIX + "float32"]), x_adv[[0, 2]])
    assert record["_confirmed"].tolist() == [True, False, True]


def test_min_norm_of_unconfirmed_failure_becomes_infinite():
    x = torch.full((2, 1, 2, 2), 100 / 255)
    x_adv = x.clone()
    x_adv[0] += 0.3 / 255
    x_adv[1] += 1 / 255
    norms = torch.tensor([0.3 / 255, 1 / 255], dtype=torch.float64)
    extras = {"min_norm": norms.clone()}
    replayer = replay_mod.Replayer(OffGrid(), "test", eps=1 / 255, norm="linf", batch_size=4)
    replayer.chunk_record(x, x_adv, torch.zeros(2, dtype=torch.long), np.array([True, True]), np.arange(2), extras)
    assert extras["min_norm"][0] == norms[0] and extras["min_norm"][1] == float("inf")
