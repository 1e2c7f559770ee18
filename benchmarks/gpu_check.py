"""One part of the prepared device check (benchmarks/gpu_check.sh): prints one JSON line.

    python benchmarks/gpu_check.py PART [--tiny]

Parts: pgd, absld, compile, aa, nccl, ort, resume (the CUDA tests are run by the shell script).
Synthetic CIFAR-sized data (3x32x32, 10 classes); on a GPU the sizes below, with --tiny a
few images and small models on the CPU, so that CI checks the whole script in seconds.
Every figure is measured in this run against a reference measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from robaudit.audit.attacks import create_attack  # noqa: E402
from robaudit.audit.models.architectures import create_architecture, wide_resnet_name  # noqa: E402
from robaudit.audit.precision import tf32_policy  # noqa: E402


def sizes(tiny: bool) -> dict:
    if tiny:
        return {"device": "cpu", "n": 8, "batch": 8, "pgd_steps": 2, "cpu_ref": 8, "absld_n": 8, "absld_batch": 4,
                "teacher": "smallcnn", "student": "smallcnn", "aa_n": 4, "aa_iter": 2, "aa_queries": 10,
                "ort_n": 8, "ort_repeats": 1, "resume_n": 16}
    return {"device": "cuda", "n": 2048, "batch": 512, "pgd_steps": 20, "cpu_ref": 64, "absld_n": 5120,
            "absld_batch": 128, "teacher": wide_resnet_name(34, 10), "student": "mobilenetv2", "aa_n": 256,
            "aa_iter": 100, "aa_queries": 1000, "ort_n": 1024, "ort_repeats": 5, "resume_n": 1024}


def synthetic(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def model(name: str, device, seed: int = 0):
    torch.manual_seed(seed)
    return create_architecture(name, 10).to(device).eval()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class GpuUtilisation:
    """Mean GPU utilisation (%) sampled by nvidia-smi every 200 ms while the block runs."""

    def __init__(self, device):
        self.enabled = torch.device(device).type == "cuda"
        self.samples: list = []

    def __enter__(self):
        if self.enabled:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "200"], stdout=subprocess.PIPE, text=True)
            self.reader = threading.Thread(target=lambda: self.samples.extend(
                float(line) for line in self.proc.stdout if line.strip()), daemon=True)
            self.reader.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.proc.terminate()
            self.reader.join(timeout=2)

    @property
    def mean(self):
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


# ---------------------------------------------------------------------------- parts
def part_pgd(s: dict) -> dict:
    """PGD-20 images/s on ResNet-18, TF32 on and off, and per-sample flips against the CPU."""
    device = s["device"]
    x, y = synthetic(s["n"])
    net = model("resnet18", device)
    attack = create_attack("pgd", steps=s["pgd_steps"])
    out = {}
    flags = {}
    for tf32 in (False, True):
        with tf32_policy(tf32):
            robust = []
            sync(device)
            t0 = time.perf_counter()
            for start in range(0, s["n"], s["batch"]):
                xb, yb = x[start:start + s["batch"]].to(device), y[start:start + s["batch"]].to(device)
                index = torch.arange(start, start + len(yb), device=device)
                with torch.no_grad():
                    clean = net(xb).argmax(1)
                robust.append(attack(net, xb, yb, index, clean).robust)
            sync(device)
            seconds = time.perf_counter() - t0
        flags[tf32] = torch.cat(robust).cpu()
        out[f"images_per_s_tf32_{'on' if tf32 else 'off'}"] = round(s["n"] / seconds, 1)
    ref_n = s["cpu_ref"]
    cpu_net = model("resnet18", "cpu")
    cpu_net.load_state_dict({k: v.cpu() for k, v in net.state_dict().items()})
    xr, yr = x[:ref_n], y[:ref_n]
    with torch.no_grad():
        cpu_clean = cpu_net(xr).argmax(1)
    cpu_robust = attack(cpu_net, xr, yr, torch.arange(ref_n), cpu_clean).robust
    out.update({"cpu_reference_n": ref_n,
                "flips_vs_cpu_tf32_off": int((flags[False][:ref_n] != cpu_robust).sum()),
                "flips_vs_cpu_tf32_on": int((flags[True][:ref_n] != cpu_robust).sum()),
                "robust_fraction": round(float(flags[False].float().mean()), 4), "n": s["n"]})
    return out


def part_absld(s: dict, variants=(("bf16", False), ("fp32", False)), images: int = 0) -> dict:
    """ABSLD seconds for absld_n images (teacher -> student), bf16 and fp32; peak memory, GPU use."""
    from robaudit.audit.data.datasets import EvalData
    from robaudit.remediate import RemediateConfig, run_remediate
    from types import SimpleNamespace
    device = s["device"]
    images = images or s["absld_n"]
    x, y = synthetic(images)
    data = EvalData(name="synthetic", split="train", x=x, y=y, index=torch.arange(len(y)), classes=[str(k) for k in range(10)],
                    subset={"limit": None, "n_per_class": None, "total_in_split": len(y)}, source="memory")
    teacher = SimpleNamespace(module=model(s["teacher"], device), path="synthetic-teacher")
    out = {"images": images, "teacher": s["teacher"], "student": s["student"]}
    for precision, compile_student in variants:
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as tmp, GpuUtilisation(device) as util:
            cfg = RemediateConfig(out_dir=Path(tmp), method="absld", student=s["student"], epochs=1,
                                  batch_size=s["absld_batch"], val_per_class=0, milestones=(1,), device=device,
                                  precision=precision, compile=compile_student, export_formats=(), progress=False,
                                  steps=10 if device == "cuda" else 1)
            t0 = time.perf_counter()
            summary = run_remediate(cfg, teacher=teacher, train_data=data)
            seconds = time.perf_counter() - t0
        key = precision + ("+compile" if compile_student else "")
        out[key] = {"seconds": round(seconds, 2), "epoch_seconds_50k": round(seconds * 50000 / images, 1),
                          "peak_memory_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                                              if torch.device(device).type == "cuda" else None),
                          "gpu_utilisation_pct": util.mean, "epochs": summary["epochs"]}
    return out


def part_compile(s: dict) -> dict:
    """--compile on the launch-bound student: bf16 vs bf16 + torch.compile, on a quarter of the
    absld images (the compiled run includes its one-off compilation, reported apart as well)."""
    backend = "inductor"
    if s["device"] == "cpu":   # --tiny: inductor's C++ build alone takes ~45 s on a CPU core
        import robaudit.remediate.train as train
        from robaudit.remediate.speed import compiled_for_training
        backend = "aot_eager"
        train.compiled_for_training = lambda module: compiled_for_training(module, backend=backend)
    out = part_absld(s, variants=(("bf16", False), ("bf16", True)), images=max(s["absld_n"] // 4, 4))
    return {**out, "backend": backend}


def part_aa(s: dict) -> dict:
    """AutoAttack images/s per component (APGD-CE, APGD-T, FAB-T, Square) on ResNet-18."""
    from robaudit.audit.attacks.autoattack import build_autoattack
    device = s["device"]
    x, y = synthetic(s["aa_n"])
    net = model("resnet18", device)
    x, y = x.to(device), y.to(device)
    out = {"n": s["aa_n"], "batch": s["aa_n"], "n_iter": s["aa_iter"], "n_queries": s["aa_queries"]}
    with torch.no_grad():
        for component in ("apgd-ce", "apgd-t", "fab-t", "square"):
            adversary = build_autoattack(net, eps=8 / 255, seed=0, device=device, num_classes=10,
                                         n_iter=s["aa_iter"], n_queries=s["aa_queries"])
            adversary.attacks_to_run = [component]
            sync(device)
            t0 = time.perf_counter()
            adversary.run_standard_evaluation(x, y, batch_size=s["aa_n"])
            sync(device)
            out[f"{component}_images_per_s"] = round(s["aa_n"] / (time.perf_counter() - t0), 2)
    return out


def part_nccl(s: dict) -> dict:
    """Under `torchrun --nproc-per-node 1`: a process group on NCCL (gloo with --tiny) really
    initialised, and the collectives robaudit uses, checked on device tensors."""
    import torch.distributed as dist
    from robaudit.audit import distributed
    device = torch.device(s["device"])
    distributed.init_from_env(str(device))   # world size 1: robaudit's own path is a no-op
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    t = torch.arange(4.0, device=device)
    dist.all_reduce(t)
    parts = [torch.empty_like(t)]
    dist.all_gather(parts, t)
    box = [{"rank": dist.get_rank()}]
    dist.broadcast_object_list(box, src=0)
    dist.barrier()
    out = {"backend": dist.get_backend(), "world_size": dist.get_world_size(),
           "all_reduce_ok": bool(torch.equal(t.cpu(), torch.arange(4.0))), "all_gather_ok": bool(torch.equal(parts[0], t)),
           "broadcast_ok": box[0] == {"rank": 0}}
    dist.destroy_process_group()
    return out


def part_ort(s: dict) -> dict:
    """ResNet-18 in onnxruntime: CUDA provider (I/O binding) vs CPU provider, images/s and agreement."""
    from robaudit.audit.models.ort_runtime import OnnxRuntimeModule
    device = s["device"]
    net = model("resnet18", "cpu")
    x, _ = synthetic(s["ort_n"])
    out = {"n": s["ort_n"]}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "resnet18.onnx")
        torch.onnx.export(net, (x[:2],), path, dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
        results = {}
        for where in dict.fromkeys(["cpu", device]):
            runtime = OnnxRuntimeModule(path, device=where)
            xd = x.to(where)
            runtime(xd[:2])   # warm-up (session, CUDA kernels)
            sync(where)
            t0 = time.perf_counter()
            for _ in range(s["ort_repeats"]):
                logits = runtime(xd)
            sync(where)
            results[where] = logits.cpu()
            out[f"{where}_provider"] = runtime.provider
            out[f"{where}_images_per_s"] = round(s["ort_n"] * s["ort_repeats"] / (time.perf_counter() - t0), 1)
        out["max_abs_diff_vs_cpu"] = float((results[device] - results["cpu"]).abs().max())
    return out


def part_resume(s: dict) -> dict:
    """Straight 2 epochs vs 1 epoch + --resume 1 epoch: the largest parameter difference."""
    from robaudit.audit.data.datasets import EvalData
    from robaudit.remediate import RemediateConfig, run_remediate
    from types import SimpleNamespace
    device = s["device"]
    x, y = synthetic(s["resume_n"])
    data = EvalData(name="synthetic", split="train", x=x, y=y, index=torch.arange(len(y)), classes=[str(k) for k in range(10)],
                    subset={"limit": None, "n_per_class": None, "total_in_split": len(y)}, source="memory")
    teacher = SimpleNamespace(module=model("resnet18" if device == "cuda" else "smallcnn", device), path="t")
    with tempfile.TemporaryDirectory() as tmp:
        def run(out, epochs, resume=False):
            cfg = RemediateConfig(out_dir=Path(tmp) / out, method="absld", student="smallcnn", epochs=epochs,
                                  batch_size=128 if device == "cuda" else 8, val_per_class=0, milestones=(2,),
                                  device=device, export_formats=(), progress=False, resume=resume, steps=2)
            run_remediate(cfg, teacher=teacher, train_data=data)
            return torch.load(Path(tmp) / out / "checkpoint.pt", map_location="cpu", weights_only=True)["student"]
        a = run("straight", 2)
        run("split", 1)
        b = run("split", 2, resume=True)
    drift = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    return {"max_abs_param_drift": drift, "bitwise_equal": drift == 0.0}


PARTS = {"pgd": part_pgd, "absld": part_absld, "compile": part_compile, "aa": part_aa, "nccl": part_nccl, "ort": part_ort,
         "resume": part_resume}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--tiny", action="store_true", help="a few images, small models, on the CPU")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    s = sizes(args.tiny)
    if s["device"] == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"part": args.part, "ok": False, "error": "CUDA is not available (use --tiny on a CPU)"}))
        sys.exit(1)
    t0 = time.perf_counter()
    try:
        payload = {"part": args.part, "ok": True, "tiny": args.tiny, **PARTS[args.part](s)}
    except Exception as err:   # one line per part, whatever happens, so the others still count
        payload = {"part": args.part, "ok": False, "tiny": args.tiny, "error": f"{type(err).__name__}: {err}"[:500]}
    payload["seconds"] = round(time.perf_counter() - t0, 2)
    if s["device"] == "cuda":
        payload["device_name"] = torch.cuda.get_device_name(0)
    print(json.dumps(payload), flush=True)
    sys.exit(0 if payload["ok"] else 1)


if __name__ == "__main__":
    main()
