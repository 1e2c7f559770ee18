"""`remediate` under torchrun: 2 CPU processes (gloo, loopback only) against one process.

One `torchrun --nproc-per-node 2` launch runs this file as its worker script (see
`__main__` at the bottom) through several tiny scenarios and saves what each rank saw;
the tests compare the ranks with each other and with run_remediate in this process on
the same samples. Synthetic 3x8x8 images, a tiny conv net, 1 epoch, PGD-2: seconds.

Exactness (docs/testing.md). Ranks agree with each other bit for bit by construction (one
all-reduced tally, DDP's identical averaged gradients and broadcast buffers). Against one
process, two things differ: each rank's batches hold other samples than one process's (and
other batch compositions round differently on some CPUs: GEMM blocking), and DDP's gradient
average adds the two halves' gradients in another order than one process does (the weights
after a step differ in the last bits, on any CPU). So the scenarios compared with one
process use a student that forwards every sample alone (PerSample: a sample's values then
do not depend on its batch), and the one-global-batch scenarios train with lr 1e-30, a step
that leaves every weight bitwise unchanged. With both, every per-sample value is computed
from the same weights and the same one-sample batch in both runs, and the tallies are
float64 sums of float32 values (exact, so order-free): the aggregated per-class statistics,
temperatures, weights and validation counts are compared with `==`. The several-step
scenario ("steps", lr 0.1) checks the DDP update itself and is compared with a tight
tolerance: its weights differ in the last bits after step 1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from robaudit.audit import distributed
from robaudit.audit.data.datasets import EvalData
from robaudit.errors import UserError
from robaudit.remediate import train as train_mod
from robaudit.remediate.train import RemediateConfig, run_remediate

C = 4
COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]])
HERE = Path(__file__).resolve()
TORCHRUN = Path(sys.executable).with_name("torchrun")


# ---------------------------------------------------------------------------- shared setup
def colour_data(per_class: int = 12) -> EvalData:
    """Classes 0-2: a solid colour + noise; class 3 mixes the three colours (the hard class)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(C).repeat_interleave(per_class)
    colour = torch.where(y < 3, y, torch.randint(0, 3, (len(y),), generator=g))
    x = (COLOURS[colour][:, :, None, None] + 0.05 * torch.randn(len(y), 3, 8, 8, generator=g)).clamp(0, 1)
    order = torch.randperm(len(y), generator=g)
    return EvalData(name="synthetic", split="train", x=x[order].contiguous(), y=y[order],
                    index=torch.arange(len(y)), classes=["r", "g", "b", "mixed"],
                    subset={"limit": None, "n_per_class": per_class, "total_in_split": len(y)}, source="tests")


def make_test_split() -> EvalData:
    data = colour_data(per_class=5)
    data.split = "test"
    return data


class Teacher(nn.Module):
    """Reads the mean chromaticity: confident on classes 0-2, never predicts the hard class."""

    def forward(self, x):
        mean = x.mean(dim=(2, 3))
        chroma = mean / mean.sum(1, keepdim=True).clamp_min(1e-6)
        templates = COLOURS / COLOURS.sum(1, keepdim=True)
        scores = -50 * ((chroma[:, None, :] - templates[None]) ** 2).sum(-1)
        return torch.cat([scores, torch.full_like(scores[:, :1], -3.0)], dim=1)


class FailsOnRank(nn.Module):
    """Raises in a train-mode forward on one rank only (a crash mid-epoch)."""

    def __init__(self, inner: nn.Module, rank: int):
        super().__init__()
        self.inner, self.rank = inner, rank

    def forward(self, x):
        if self.training and distributed.current().rank == self.rank:
            raise RuntimeError(f"boom on rank {self.rank}")
        return self.inner(x)


class PerSample(nn.Sequential):
    """nn.Sequential that forwards each sample alone (same parameters and state_dict keys):
    a sample's logits and input gradient then do not depend on which samples share its batch."""

    def forward(self, x):
        if len(x) <= 1:
            return nn.Sequential.forward(self, x)
        return torch.cat([nn.Sequential.forward(self, x[i:i + 1]) for i in range(len(x))])


def student(bn: bool = False, per_sample: bool = False) -> nn.Module:
    torch.manual_seed(0)
    norm = [nn.BatchNorm2d(8)] if bn else []
    cls = PerSample if per_sample else nn.Sequential
    return cls(nn.Conv2d(3, 8, 3, padding=1), *norm, nn.ReLU(), nn.AdaptiveAvgPool2d(1),
               nn.Flatten(), nn.Linear(8, C))


# 48 images, 2 per class held out: 40 training images.
BASE = dict(epochs=1, steps=2, val_steps=2, milestones=(2,), export_formats=(), progress=False, lr=0.1)
# One global batch per epoch, exact comparisons with one process: per-sample forwards, and
# a step that leaves the weights bitwise unchanged (the module docstring says why).
EXACT = dict(per_sample=True, lr=1e-30)
SCENARIOS = {
    "absld": dict(method="absld", batch_size=40, val_per_class=2, **EXACT),
    "fair": dict(method="fair-rslad", batch_size=40, val_per_class=0, **EXACT),
    "cfa": dict(method="cfa", batch_size=40, val_per_class=2,
                method_options={"averaging_start": 1, "fawa_threshold": 0.0}, **EXACT),
    # 15, 15, 10 per step; 15 splits 8 / 7 (uneven shares): close to one process
    "steps": dict(method="absld", batch_size=15, val_per_class=2, per_sample=True),
    # BatchNorm, several steps: the checkpoint the 1-process resume test continues
    "bn": dict(method="absld", batch_size=16, val_per_class=2, bn=True),
    "fail": dict(method="absld", batch_size=40, val_per_class=0, fail_rank=1),
    "sync_bn_cpu": dict(method="absld", batch_size=40, val_per_class=0, sync_bn=True),
    # export + the student audit: every rank calls engine.run_scan (sharded), rank 0 writes
    "audit": dict(method="absld", batch_size=40, val_per_class=0, export_formats=("torchscript",),
                  audit_attacks=("clean", "pgd"), audit_overrides={"pgd": {"steps": 2}}, audit_batch_size=8,
                  test=True),
}


def run_scenario(name: str, out_dir: Path) -> dict:
    """run_remediate for one scenario, capturing every end_epoch's reduced tallies and record."""
    spec = dict(SCENARIOS[name])
    bn, fail_rank, test = spec.pop("bn", False), spec.pop("fail_rank", None), spec.pop("test", False)
    module = student(bn, per_sample=spec.pop("per_sample", False))
    if fail_rank is not None:
        module = FailsOnRank(module, fail_rank)
    cfg = RemediateConfig(out_dir=out_dir, **{**BASE, **spec})
    captured = []
    create = train_mod.create_method

    def capturing_create(*args, **kwargs):
        method = create(*args, **kwargs)
        end_epoch = method.end_epoch

        def wrapped(epoch, **kw):
            tallies = {"tally": method.tally.clone()}
            if getattr(method, "fair", None) is not None:
                tallies["kappa_tally"] = method.fair.kappa_tally.clone()
            record = end_epoch(epoch, **kw)
            captured.append({"epoch": epoch, **tallies, "record": record})
            return record

        method.end_epoch = wrapped
        return method

    train_mod.create_method = capturing_create
    try:
        summary = run_remediate(cfg, teacher=SimpleNamespace(module=Teacher(), path="teacher"),
                                train_data=colour_data(), student_module=module,
                                test_data=make_test_split() if test else None)
        error = None
    except UserError as err:
        summary, error = None, str(err)
    finally:
        train_mod.create_method = create
    return {"captured": captured, "summary": summary, "error": error,
            "state": {k: v.clone() for k, v in module.state_dict().items()}}


# ---------------------------------------------------------------------------- the launch
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """[rank 0's results, rank 1's results] of every scenario, from one 2-process torchrun."""
    out = tmp_path_factory.mktemp("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo",
           "ROBAUDIT_DIST_TIMEOUT": "60"}
    cmd = [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
           str(free_port()), "--max-restarts", "0", str(HERE), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same scenarios in this (single) process, computed on demand."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = run_scenario(name, tmp_path_factory.mktemp(f"single-{name}"))
        return cache[name]

    return get


def same_records(a: dict, b: dict, keys) -> None:
    for key in keys:
        assert a[key] == b[key], key


# ---------------------------------------------------------------------------- tests
def test_absld_aggregated_risks_and_temperatures_identical_on_ranks_and_to_one_process(ranks, one_process):
    (r0, r1), _ = ranks
    single = one_process("absld")
    a, b, s = r0["absld"]["captured"][0], r1["absld"]["captured"][0], single["captured"][0]
    # the tallies end_epoch saw: the whole epoch's, the same bits everywhere
    assert torch.equal(a["tally"], b["tally"]) and torch.equal(a["tally"], s["tally"])
    assert a["tally"].dtype == torch.float64 and a["tally"][:, 0].tolist() == [10.0] * C
    keys = ("train_risk_adv", "train_risk_nat", "train_acc_adv", "tau_adv", "tau_nat", "beta")
    same_records(a["record"], b["record"], keys)
    same_records(a["record"], s["record"], keys)
    assert a["record"]["tau_adv"] != [1.0] * C            # the temperatures did move
    for name, value in r0["absld"]["state"].items():      # lr 1e-30: the step changed no weight
        assert torch.equal(value, student(per_sample=True).state_dict()[name]), name
    # sharded validation: per-class counts summed over ranks = one process's
    h0 = r0["absld"]["summary"]["training"]["curves"][0]
    assert h0 == {**single["summary"]["training"]["curves"][0], "loss": h0["loss"]}
    assert h0["loss"] == pytest.approx(single["summary"]["training"]["curves"][0]["loss"], rel=1e-6)
    assert r0["absld"]["summary"]["training"]["options"]["world_size"] == 2


def test_fair_ard_kappas_and_weights_identical_on_ranks_and_to_one_process(ranks, one_process):
    (r0, r1), _ = ranks
    single = one_process("fair")
    a, b, s = r0["fair"]["captured"][0], r1["fair"]["captured"][0], single["captured"][0]
    assert torch.equal(a["kappa_tally"], b["kappa_tally"]) and torch.equal(a["kappa_tally"], s["kappa_tally"])
    same_records(a["record"], b["record"], ("kappa_bar", "class_weights"))
    same_records(a["record"], s["record"], ("kappa_bar", "class_weights"))
    assert len(set(a["record"]["class_weights"])) > 1     # not all ones


def test_cfa_class_accuracies_and_weight_averaging_agree(ranks, one_process):
    (r0, r1), _ = ranks
    single = one_process("cfa")
    a, b, s = r0["cfa"]["captured"][0], r1["cfa"]["captured"][0], single["captured"][0]
    assert torch.equal(a["tally"], b["tally"]) and torch.equal(a["tally"], s["tally"])
    keys = ("train_acc_adv", "train_risk_adv", "class_eps", "class_beta", "fawa_val_worst", "fawa_updated")
    same_records(a["record"], b["record"], keys)
    same_records(a["record"], s["record"], keys)
    assert a["record"]["fawa_updated"] is True


def test_uneven_shares_over_several_steps_stay_close_to_one_process(ranks, one_process):
    (r0, r1), _ = ranks
    single = one_process("steps")
    a, b, s = r0["steps"]["captured"][0], r1["steps"]["captured"][0], single["captured"][0]
    assert torch.equal(a["tally"], b["tally"])                    # ranks: identical
    same_records(a["record"], b["record"], ("tau_adv", "tau_nat"))
    # One process: float reordering only (DDP's gradient average; per-sample forwards keep
    # batch composition out). rel 1e-5 is ~100x float32 rounding of these values; averaging
    # the uneven 8 / 7 shares as equal halves would change a step by lr (g8 - g7) / 30.
    for key in ("train_risk_adv", "train_risk_nat", "tau_adv", "tau_nat"):
        assert a["record"][key] == pytest.approx(s["record"][key], rel=1e-5, abs=1e-6), key
    for name, value in r0["steps"]["state"].items():
        torch.testing.assert_close(value, single["state"][name], rtol=1e-5, atol=1e-6)


def test_two_rank_checkpoint_resumes_in_one_process(ranks, tmp_path):
    (r0, r1), out = ranks
    for name, value in r0["bn"]["state"].items():   # one model on both ranks, BatchNorm buffers included
        assert torch.equal(value, r1["bn"]["state"][name]), name
    saved = torch.load(out / "bn" / "checkpoint.pt", weights_only=True)
    assert all(not k.startswith("module.") for k in saved["student"])
    for name, value in saved["student"].items():
        assert torch.equal(value, r0["bn"]["state"][name]), name
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    for name in ("checkpoint.pt", "best.pt"):
        (resumed_dir / name).write_bytes((out / "bn" / name).read_bytes())
    cfg = RemediateConfig(out_dir=resumed_dir, **{**BASE, "epochs": 2, "method": "absld", "batch_size": 16,
                                                  "val_per_class": 2, "resume": True})
    summary = run_remediate(cfg, teacher=SimpleNamespace(module=Teacher(), path="teacher"),
                            train_data=colour_data(), student_module=student(bn=True))
    assert summary["epochs"] == 2
    history = torch.load(resumed_dir / "checkpoint.pt", weights_only=True)["history"]
    assert [h["world_size"] for h in history] == [2, 1]
    assert history[0]["method"] == saved["history"][0]["method"]
    assert history[1]["method"]["tau_adv"] != history[0]["method"]["tau_adv"]


def test_a_failing_rank_stops_every_rank_with_one_line_and_no_outputs(ranks):
    (r0, r1), out = ranks
    assert r0["fail"]["error"] == ("rank 1 of 2 failed (RuntimeError: boom on rank 1); no results were written")
    assert r1["fail"]["error"] == r0["fail"]["error"]
    assert "\n" not in r0["fail"]["error"]
    assert sorted(p.name for p in (out / "fail").iterdir()) == []


def test_sync_bn_on_cpu_is_refused_on_every_rank(ranks):
    (r0, r1), _ = ranks
    for r in (r0, r1):
        assert r["sync_bn_cpu"]["error"].startswith("--sync-bn needs GPUs")


def test_student_audit_is_sharded_and_written_once_by_rank_0(ranks):
    import json

    (r0, r1), out = ranks
    results = json.loads((out / "audit" / "student" / "results.json").read_text())
    assert results["training"]["options"]["world_size"] == 2
    assert results["environment"]["world_size"] == 2
    a, b = r0["audit"]["summary"]["student_results"], r1["audit"]["summary"]["student_results"]
    for name in ("clean", "pgd"):   # every rank holds the merged audit
        strip = lambda block: {k: v for k, v in block.items() if k != "seconds"}  # noqa: E731
        assert strip(a["attacks"][name]) == strip(b["attacks"][name]) == strip(results["attacks"][name])
    assert r1["audit"]["summary"]["exports"] == r0["audit"]["summary"]["exports"]
    assert sorted(p.name for p in (out / "audit").iterdir() if not p.name.startswith(".")) == [
        "checkpoint.pt", "metrics.csv", "student", "student.torchscript.pt"]


def test_single_process_helpers_are_no_ops():
    t = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    total = distributed.sum_over_ranks(t)
    assert torch.equal(total, t) and total is not t
    distributed.broadcast_tensors_([t])
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}


def test_global_batch_must_cover_the_processes():
    cfg = RemediateConfig(out_dir=Path("unused"), batch_size=3)
    with pytest.raises(UserError, match="global batch"):
        train_mod.check_config(cfg, world_size=4)


# ---------------------------------------------------------------------------- torchrun worker
if __name__ == "__main__":
    torch.set_num_threads(1)
    ctx = distributed.init_from_env("cpu")
    base = Path(sys.argv[1])
    results = {}
    for scenario in SCENARIOS:
        results[scenario] = run_scenario(scenario, base / scenario)
    torch.save(results, base / f"rank{ctx.rank}.pt")
    distributed.barrier()
    torch.distributed.destroy_process_group()
