"""Whole-scan cost of the replay on the artifact + the evidence file, and the evidence size.

    python benchmarks/bench_replay.py                 # the subset's 1017 test images, PGD-20, 5 repeats
    python benchmarks/bench_replay.py --quick         # 128 images, 1 repeat

Timing: `run_scan` (clean + PGD-20, no report) on the same model, images and batch size,
once with `replay=False, write_evidence=False` and once with the defaults (every failure
replayed on the artifact, evidence.npz written), runs interleaved, each in a fresh --out
(no resume), median over --repeats. Because whole-scan times on a loaded machine vary by
more than the replay costs, the time spent inside the replay and the evidence writer is also
measured directly (wrapped functions) as a share of each replayed scan. Both the .pt2 form (replay: the same program at
another batch composition) and the ONNX form (attacked through onnx2torch, replayed in
onnxruntime) of the benchmark model (benchmarks/train_models.py) are measured.

Size: bytes per stored failure of evidence.npz, and of alternative encodings of the
same failures (full uint8 images, float32 images; deflate or LZMA), measured on
clean,fgsm,pgd,cw; the size of a full CIFAR-10 audit (10,000 images, default attacks
clean,fgsm,pgd,cw,aa) is extrapolated from the per-attack failure rates (AutoAttack
taken as PGD's bytes per failure and its failure rate + 1 point).

Prints tables; writes benchmarks/_results/bench_replay.json.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

import common


def scan(model, data, attacks, out: Path, replay: bool, batch_size: int):
    from robaudit.audit.engine import ScanConfig, run_scan

    cfg = ScanConfig(out_dir=out, attacks=list(attacks), batch_size=batch_size, device="cpu",
                     write_report=False, replay=replay, write_evidence=replay)
    return run_scan(cfg, model=model, data=data)


class Stopwatch:
    """Seconds spent inside the replay (opening the artifact's runtime, Replayer.chunk_record)
    and the evidence writer: the cost measured directly, which a loaded machine's noise on whole-scan times can hide."""

    def __init__(self):
        from robaudit.audit import evidence as evidence_mod
        from robaudit.audit import replay as replay_mod

        self.seconds = 0.0
        for owner, name in ((replay_mod.Replayer, "chunk_record"), (replay_mod, "scan_replayer"),
                            (evidence_mod, "write_scan_evidence")):
            setattr(owner, name, self._timed(getattr(owner, name)))

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return wrapper


def time_overhead(model, data, repeats: int, batch_size: int, watch: Stopwatch) -> dict:
    times = {"off": [], "on": []}
    inside = []
    with tempfile.TemporaryDirectory() as tmp:
        scan(model, data, ["clean", "pgd"], Path(tmp) / "warmup", True, batch_size)  # not timed
        for r in range(repeats):
            for mode in ("off", "on"):
                out = Path(tmp) / f"{mode}{r}"
                before = watch.seconds
                _, spent = common.timed(lambda: scan(model, data, ["clean", "pgd"], out, mode == "on", batch_size))
                times[mode] += spent
                if mode == "on":
                    inside.append((watch.seconds - before) / spent[0])
    off, on = common.median(times["off"]), common.median(times["on"])
    return {"seconds_off": times["off"], "seconds_on": times["on"], "median_off": off, "median_on": on,
            "overhead": on / off - 1, "share_inside": inside, "median_share_inside": common.median(inside)}


def _zip_size(arrays: dict, method: int) -> int:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, value in arrays.items():
            with zf.open(name + ".npy", "w") as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(value), allow_pickle=False)
    return len(buf.getvalue())


def sizes(model, data, batch_size: int) -> dict:
    """Bytes per failure of evidence.npz and of other encodings, per attack."""
    from robaudit.audit import evidence as evidence_mod

    with tempfile.TemporaryDirectory() as tmp:
        results = scan(model, data, ["clean", "fgsm", "pgd", "cw"], Path(tmp), True, batch_size)
        file_bytes = (Path(tmp) / "evidence.npz").stat().st_size
        ev = evidence_mod.read(Path(tmp) / "evidence.npz")
    n = len(data.y)
    out = {"file_bytes": file_bytes, "n": n, "attacks": {}}
    for name in ev.manifest["attacks"]:
        part = ev.attack(name)
        failures = len(part["position"])
        if not failures:
            continue
        import torch

        images = ev.images(name, data.x[torch.from_numpy(part["position"])]).numpy()
        u8 = np.round(images * 255).astype(np.uint8)
        ours = {k: v for k, v in part.items()}
        per = {
            "int8 delta, deflate (chosen)": _zip_size(ours, zipfile.ZIP_DEFLATED),
            "int8 delta, LZMA": _zip_size(ours, zipfile.ZIP_LZMA),
            "uint8 image, deflate": _zip_size({**ours, "delta8": u8}, zipfile.ZIP_DEFLATED),
            "float32 image, deflate": _zip_size({**ours, "delta8": images}, zipfile.ZIP_DEFLATED),
        }
        out["attacks"][name] = {"failures": failures, "failure_rate": failures / n,
                                "realizable": sum(results["attacks"][name]["replay"]["realizable"]),
                                "bytes_per_failure": {k: v / failures for k, v in per.items()}}
    return out


def extrapolate(size: dict, total: int = 10000) -> dict:
    """Bytes of a full CIFAR-10 audit with the default attacks, per encoding."""
    attacks = dict(size["attacks"])
    if "pgd" in attacks:
        aa = dict(attacks["pgd"])
        aa["failure_rate"] = min(1.0, aa["failure_rate"] + 0.01)
        attacks["aa"] = aa
    encodings = next(iter(attacks.values()))["bytes_per_failure"].keys()
    return {enc: sum(total * a["failure_rate"] * a["bytes_per_failure"][enc] for a in attacks.values())
            for enc in encodings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--models-dir", default=None)
    parser.add_argument("--model", default="adversarial", help="benchmark model name (train_models.py)")
    parser.add_argument("--limit", type=int, default=None, help="default: the whole test split of the subset")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--forms", default="pt2,onnx", help="model forms to time (pt2, onnx)")
    parser.add_argument("--no-size", action="store_true", help="time only; skip the evidence sizes")
    common.add_threads_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.limit, args.repeats = 128, 1
    common.set_threads(args.threads)
    info = common.machine()
    print(common.machine_line(info))
    path = common.data_path(args.data)
    data = common.load_split(path, "test", limit=args.limit)
    root = common.models_dir(args.models_dir, args.quick)
    rows, timing = [], {}
    watch = Stopwatch()
    for form in [f for f in args.forms.split(",") if f]:
        model = common.load(args.model, form, root)
        timing[form] = time_overhead(model, data, args.repeats, args.batch_size, watch)
        t = timing[form]
        rows.append([form, len(data.y), f"{t['median_off']:.2f}", f"{t['median_on']:.2f}", common.pct(t["overhead"]),
                     common.pct(t["median_share_inside"])])
    print(common.table(["form", "images", "scan s (no replay)", "scan s (replay+evidence)", "overhead",
                        "inside replay+evidence"], rows))
    if args.no_size:
        common.write_result("bench_replay_timing", {"machine": info, "data": str(path), "model": args.model,
                                                    "timing": timing})
        return
    size = sizes(common.load(args.model, "pt2", root), data, args.batch_size)
    size_rows = [[name, a["failures"], a["realizable"], *[f"{v:.0f}" for v in a["bytes_per_failure"].values()]]
                 for name, a in size["attacks"].items()]
    encodings = list(next(iter(size["attacks"].values()))["bytes_per_failure"])
    print(common.table(["attack", "failures", "realizable", *[f"B/failure {e}" for e in encodings]], size_rows))
    full = extrapolate(size)
    print(f"evidence.npz on {len(data.y)} images: {size['file_bytes']} bytes")
    for enc, total in full.items():
        print(f"full CIFAR-10 audit (10,000 images, clean,fgsm,pgd,cw,aa), {enc}: {total / 1e6:.1f} MB")
    common.write_result("bench_replay", {"machine": info, "data": str(path), "model": args.model,
                                         "limit": args.limit, "timing": timing, "size": size,
                                         "full_cifar10_bytes": full})


if __name__ == "__main__":
    main()
