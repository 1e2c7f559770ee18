"""scan_chunks: per-sample extras and summed stats survive chunking, resume and sharding."""

from __future__ import annotations

import numpy as np
import torch

from robaudit.audit.attacks.base import Attack, SubResult
from robaudit.audit.scan_chunks import EXTRA_PREFIX, ScanState, attack_shard, merge_shards

from test_engine import Centroid, make_data


class IndexEcho(Attack):
    """Not registered: returns x unchanged, an extra equal to each point's dataset index
    (so any misplacement shows) and a stat counting points per chunk and step."""

    name = "echo"
    extra_defaults = {"echo": -1.0}

    def _attack(self, model, x, y, index, clean_pred):
        pred = model(x).argmax(dim=1)
        counts = torch.ones(3, dtype=torch.float64) * x.shape[0]
        return SubResult(x, pred, {"echo": index.double() * 2}, {"count": counts})


def _run(data, positions, batch_size, state=None):
    module = Centroid().eval()
    with torch.no_grad():
        clean_pred = module(data.x).argmax(dim=1)
    attack = IndexEcho(eps=0.0)
    shard = attack_shard("echo", attack, attack.params(), module, data, clean_pred, positions,
                         batch_size, torch.device("cpu"), state, len(data.classes))
    return shard, clean_pred


def test_extras_are_per_sample_and_defaulted_at_unattacked_points():
    data = make_data()
    positions = np.arange(len(data.y), dtype=np.int64)
    shard, clean_pred = _run(data, positions, batch_size=7)
    attacked = (clean_pred == data.y).numpy()
    assert 0 < attacked.sum() < len(attacked)  # both kinds of point are exercised
    expected = np.where(attacked, data.index.numpy() * 2.0, -1.0)
    np.testing.assert_array_equal(shard["extras"]["echo"], expected)
    # stats add up over chunks: every attacked point counted once per entry
    np.testing.assert_array_equal(shard["stats"]["count"], np.full(3, attacked.sum(), dtype=np.float64))


def test_extras_survive_resume_and_merge_across_shards(tmp_path):
    data = make_data()
    n = len(data.y)
    state = ScanState(tmp_path, {"run": "test"})
    full, clean_pred = _run(data, np.arange(n, dtype=np.int64), batch_size=5, state=state)
    chunk_files = list(tmp_path.rglob("*.npz"))
    assert chunk_files and all(EXTRA_PREFIX + "echo" in np.load(p).files for p in chunk_files)
    again, _ = _run(data, np.arange(n, dtype=np.int64), batch_size=5, state=state)  # all from disk
    np.testing.assert_array_equal(again["extras"]["echo"], full["extras"]["echo"])
    np.testing.assert_array_equal(again["stats"]["count"], full["stats"]["count"])

    # two "ranks" with interleaved positions merge back to the single-shard arrays
    shards = [_run(data, np.arange(r, n, 2, dtype=np.int64), batch_size=3)[0] for r in (0, 1)]
    merged = merge_shards(shards, clean_pred.numpy(), data.y.numpy(), data.x.shape[1:])
    np.testing.assert_array_equal(merged["extras"]["echo"], full["extras"]["echo"])
    np.testing.assert_array_equal(merged["stats"]["count"], full["stats"]["count"])
    np.testing.assert_array_equal(merged["robust"], full["robust"])
