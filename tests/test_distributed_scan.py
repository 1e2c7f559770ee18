"""torchrun scan: 2 gloo ranks give exactly the per-sample results of 1 process (issue 9).

Exact by construction: --batch-size 1, so every forward and backward of either run sees a
batch holding one sample, whatever shard it landed in, with one thread per process. With
larger batches the ranks' batches hold other samples than one process's, and other batch
compositions round differently on some CPUs (a sign step can flip a point).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from robaudit.audit.distributed import shard_positions
from robaudit.audit.models.loading import save_export

TORCHRUN = Path(sys.executable).with_name("torchrun")


def test_shards_interleave_classes_and_cover_every_sample_once():
    labels = np.array([0, 0, 1, 1, 1, 2, 0, 2, 1, 0])
    shards = [shard_positions(labels, r, 3) for r in range(3)]
    merged = np.sort(np.concatenate(shards))
    assert merged.tolist() == list(range(len(labels)))
    # the i-th sample of each class goes to rank i % 3 (class 0 at 0,1,6,9; class 1 at 2,3,4,8; class 2 at 5,7)
    assert shards[0].tolist() == [0, 2, 5, 8, 9]
    assert shards[1].tolist() == [1, 3, 7]
    assert shards[2].tolist() == [4, 6]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def tiny_case(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(40, 16, 16, 3), dtype=np.uint8)
    y = np.repeat(np.arange(4), 10)[rng.permutation(40)]
    data = tmp_path / "tiny.npz"
    np.savez(data, x_test=x, y_test=y)
    torch.manual_seed(0)
    # a linear classifier on random images: varied predictions with small margins, so the
    # attacks fool some points but not all and the equality below is not vacuous
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4)).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    np.savez(data, x_test=x, y_test=logits.argmax(1).numpy(), class_names=np.array(["a", "b", "c", "d"]))
    model_path = tmp_path / "m.pt2"
    save_export(model, str(model_path), torch.zeros(2, 3, 16, 16))
    return data, model_path


def _as_png_folder(data: Path) -> Path:
    """The same images as a lazily loaded image folder (PNG: lossless, so the pixels match)."""
    from PIL import Image

    root = data.parent / "folder"
    with np.load(data) as f:
        x, y, names = f["x_test"], f["y_test"], [str(n) for n in f["class_names"]]
    for i, (image, label) in enumerate(zip(x, y)):
        (root / names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / names[label] / f"{i:03d}.png")
    return root


def _scan(tmp_path, data, model_path, out, nproc):
    args = [str(model_path), "--dataset", str(data), "--attacks", "clean,fgsm,pgd,cw,fmn",
            "--eps", "8/255", "--attack-opt", "pgd.steps=3", "--attack-opt", "cw.steps=3",
            "--attack-opt", "fmn.steps=10",
            "--batch-size", "1", "--device", "cpu", "--out", str(out), "--no-report"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "robaudit", "scan", *args]
    else:
        cmd = [str(TORCHRUN), f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={_free_port()}", "-m", "robaudit", "scan", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("form", ["npz", "folder"])
def test_two_ranks_equal_one_process(tmp_path, tiny_case, form):
    """In memory (npz) and streamed from an image folder; fmn's per-sample minimal norms
    (samples.npz min_norm_fmn) are gathered across ranks like every other array."""
    if not TORCHRUN.exists():
        pytest.skip("torchrun not found next to the python executable")
    data, model_path = tiny_case
    if form == "folder":
        data = _as_png_folder(data)
    one = _scan(tmp_path, data, model_path, tmp_path / "one", 1)
    two = _scan(tmp_path, data, model_path, tmp_path / "two", 2)
    a = np.load(tmp_path / "one" / "samples.npz")
    b = np.load(tmp_path / "two" / "samples.npz")
    assert sorted(a.files) == sorted(b.files) and "min_norm_fmn" in a.files
    for key in a.files:
        assert np.array_equal(a[key], b[key]), key
    ra = json.loads((tmp_path / "one" / "results.json").read_text())
    rb = json.loads((tmp_path / "two" / "results.json").read_text())
    assert rb["environment"]["world_size"] == 2 and ra["environment"]["world_size"] == 1
    for name in ra["attacks"]:
        assert ra["attacks"][name]["per_class"] == rb["attacks"][name]["per_class"]
    assert ra["target_flow"] == rb["target_flow"]
    assert ra["curves"] == rb["curves"]
    assert [e["index"] for e in ra["examples"]] == [e["index"] for e in rb["examples"]]
    for name in ra["attacks"]:  # the failures replayed on the artifact, gathered in subset order
        assert ra["attacks"][name].get("replay") == rb["attacks"][name].get("replay")
    ea, eb = np.load(tmp_path / "one" / "evidence.npz"), np.load(tmp_path / "two" / "evidence.npz")
    assert sorted(ea.files) == sorted(eb.files) and "pgd__delta8" in ea.files
    for key in ea.files:
        if key != "manifest":
            assert np.array_equal(ea[key], eb[key]), key
    # the attacks fooled some points and not others, so the equality is not vacuous
    robust = a["robust_pgd"]
    assert 0 < robust.sum() < len(robust)
    # rank 0 alone prints the table
    assert two.stdout.count("worst class") == 1
