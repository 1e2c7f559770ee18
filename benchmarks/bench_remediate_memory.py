"""Peak memory of `remediate` against the training-set size: streamed vs held in memory (issue 28).

Generates Tiny-ImageNet layouts (64x64 JPEGs, 4 classes) with 1x, 2x and 8x the training
images and trains one epoch on each in a fresh process, twice: streamed (the images decoded
batch by batch in --workers processes, remediate/streamed_data.py) and, as the reference in
the same run, the old path (the whole training split decoded into one tensor first). Each
child reports its own peak RSS (getrusage RUSAGE_SELF, ru_maxrss). The decode workers are
separate processes of bounded size (a batch or two each) and are not counted.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_remediate_memory.py [--base 100] [--workers 2]

The streamed 8x / 2x ratio must stay near 1 (<= 1.10); the in-memory path grows by the
images' float32 size (4 * 3 * 64 * 64 bytes = 48 KiB an image).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchmarks.common import machine, machine_line, table, write_result  # noqa: E402

FACTORS = (1, 2, 8)
CLASSES = 4


def child(folder: str, mode: str, workers: int) -> dict:
    import torch

    from robaudit.audit.data.datasets import load_dataset
    from robaudit.remediate.common import RemediateConfig
    from robaudit.remediate.train import run_remediate

    torch.set_num_threads(1)
    data = load_dataset("tinyimagenet", split="train", data_dir=folder, download=False, workers=workers)
    if mode == "memory":
        data.x = data.x[:]   # the whole split decoded up front (the path before streaming)
    cfg = RemediateConfig(out_dir=Path(folder) / f"out-{mode}", method="sat", student="smallcnn", epochs=1,
                          batch_size=64, steps=1, val_per_class=2, val_steps=1, export_formats=(),
                          progress=False, device="cpu")
    start = time.perf_counter()
    run_remediate(cfg, teacher=None, train_data=data)
    return {"images": len(data.y), "seconds": time.perf_counter() - start,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=100, help="training images per class at 1x")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "MODE"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.workers)))
        return
    from paper_layouts import write_tinyimagenet

    info = machine()
    rows, runs = [], []
    with tempfile.TemporaryDirectory(prefix="robaudit-memory.") as tmp:
        for factor in FACTORS:
            root = Path(tmp) / f"x{factor}"
            write_tinyimagenet(root, per_class_train=args.base * factor, per_class_val=1,
                               wnids=[f"n0000000{k}" for k in range(CLASSES)])
            for mode in ("streamed", "memory"):
                out = subprocess.run([sys.executable, __file__, "--workers", str(args.workers), "--child",
                                      str(root), mode], check=True, capture_output=True, text=True).stdout
                run = {"factor": factor, "mode": mode, **json.loads(out.strip().splitlines()[-1])}
                runs.append(run)
                rows.append([mode, factor, run["images"], f"{run['seconds']:.1f}", f"{run['peak_rss_mib']:.0f}"])
    peak = {(r["mode"], r["factor"]): r["peak_rss_mib"] for r in runs}
    ratios = {mode: {"8x/2x": peak[(mode, 8)] / peak[(mode, 2)], "2x/1x": peak[(mode, 2)] / peak[(mode, 1)]}
              for mode in ("streamed", "memory")}
    print(machine_line(info))
    print(table(["mode", "x", "train images", "seconds", "peak RSS MiB"], rows))
    for mode, r in ratios.items():
        print(f"{mode}: peak 8x/2x = {r['8x/2x']:.3f}, 2x/1x = {r['2x/1x']:.3f}")
    write_result("remediate_memory", {"machine": info, "runs": runs, "ratios": ratios,
                                      "base_per_class": args.base, "workers": args.workers})
    if ratios["streamed"]["8x/2x"] > 1.10:
        raise SystemExit(f"streamed peak memory grew {ratios['streamed']['8x/2x']:.2f}x from 2x to 8x (> 1.10)")


if __name__ == "__main__":
    main()
