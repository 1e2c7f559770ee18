"""ImageNet-scale scan: a torchvision ResNet-50 (random weights) on a generated folder of
variable-size JPEGs with --preprocess robustbench-imagenet (resize 256, center crop 224).

Measures (issue 17):
1. data loading vs compute: robaudit's lazy folder streamed with stream_batches (0 workers
   and --workers), the time spent waiting for the next batch against the time in the model;
2. images/s of a clean scan and of PGD-20 through `robaudit scan` (PGD on --pgd-images
   images only: 20 forward+backward passes of a ResNet-50 at 224 px take seconds per image
   on a CPU);
3. peak memory (ru_maxrss of a fresh process per size) of a clean scan at each --sizes,
   and the 2000-vs-250 ratio (issue 17: must be <= 1.3). The decode workers' RUSAGE_CHILDREN
   peak is kept in the JSON only: forked workers report the pages they share with the
   scan, so it equals the scan's own peak and says nothing about the workers themselves.

Not run by the tests. Full run (a few tens of minutes on 2 CPU cores):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_imagenet_scale.py
Smoke test:
    .venv/bin/python benchmarks/bench_imagenet_scale.py --sizes 16,32 --pgd-images 2 --batch-size 8 --loading-images 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_threads_option, machine, machine_line, set_threads, table, write_result  # noqa: E402

CLASSES = 10


def generate_folder(root: Path, count: int, seed: int = 0) -> Path:
    """`count` JPEGs, 300-500 px a side, spread over CLASSES synset folders (n00000000 ...)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    made = sum(1 for _ in root.rglob("*.JPEG")) if root.is_dir() else 0
    for k in range(made, count):
        synset = f"n{k % CLASSES:08d}"
        height, width = (int(v) for v in rng.integers(300, 501, size=2))
        yy, xx = np.mgrid[0:height, 0:width]
        # smooth structure plus noise: compresses and decodes like a photo, not like pure noise
        base = np.stack([(xx * (k % 7 + 1)) % 256, (yy * 3) % 256, ((xx + yy) // 2) % 256], -1)
        pixels = (0.7 * base + rng.integers(0, 77, size=(height, width, 3))).astype(np.uint8)
        (root / synset).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / synset / f"{synset}_{k:06d}.JPEG", quality=85)
    return root


def save_model(path: Path) -> Path:
    import torch
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None, num_classes=CLASSES).state_dict(), path)
    return path


def loading_vs_compute(folder: Path, images: int, batch_size: int, workers: int) -> dict:
    """Seconds waiting for batches vs seconds in the model, streaming `images` images."""
    import numpy as np
    import torch
    import torchvision

    from robaudit.audit.data.datasets import load_dataset
    from robaudit.audit.data.image_folders import stream_batches

    data = load_dataset(folder, preprocess="robustbench-imagenet", n_per_class=max(1, images // CLASSES))
    model = torchvision.models.resnet50(weights=None, num_classes=CLASSES).eval()
    positions = np.arange(len(data.x))
    batches = [positions[s:s + batch_size] for s in range(0, len(positions), batch_size)]
    wait = compute = 0.0
    t0 = time.perf_counter()
    stream = stream_batches(data.x, batches, num_workers=workers)
    with torch.no_grad():
        while True:
            t_wait = time.perf_counter()
            batch = next(stream, None)
            wait += time.perf_counter() - t_wait
            if batch is None:
                break
            t_model = time.perf_counter()
            model(batch)
            compute += time.perf_counter() - t_model
    total = time.perf_counter() - t0
    return {"workers": workers, "images": len(data.x), "wait_s": round(wait, 2), "model_s": round(compute, 2),
            "total_s": round(total, 2), "images_per_s": round(len(data.x) / total, 2)}


def scan_command(model: Path, folder: Path, out: Path, n_per_class: int, attacks: str, batch_size: int,
                 extra=()) -> list:
    return ["scan", str(model), "--arch", "resnet50", "--dataset", str(folder), "--preprocess",
            "robustbench-imagenet", "--n-per-class", str(n_per_class), "--attacks", attacks,
            "--batch-size", str(batch_size), "--device", "cpu", "--out", str(out), "--no-report", *extra]


def child(argv) -> None:
    """Run one scan in this (fresh) process; print JSON with seconds and peak RSS."""
    from robaudit.cli import main

    t0 = time.perf_counter()
    try:
        main(argv)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
    seconds = time.perf_counter() - t0
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # KiB -> MiB on Linux
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("BENCH " + json.dumps({"seconds": seconds, "peak_rss_mib": own, "worker_peak_rss_mib": workers}))


def run_child(argv, threads) -> dict:
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    done = subprocess.run([sys.executable, __file__, "--child", *argv], env=env, capture_output=True, text=True)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"scan failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(line[6:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="250,1000,2000,4000", help="clean-scan sizes (images)")
    parser.add_argument("--pgd-images", type=int, default=10, help="images of the PGD-20 scan")
    parser.add_argument("--loading-images", type=int, default=250, help="images of the loading-vs-compute run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--folder", default=None, help="reuse/extend this generated folder (default: a temp dir)")
    add_threads_option(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    info = machine()
    print(machine_line(info))

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folder = Path(args.folder) if args.folder else scratch / "imagenet"
        t0 = time.perf_counter()
        generate_folder(folder, max(sizes + [args.loading_images, args.pgd_images]))
        print(f"generated {folder} in {time.perf_counter() - t0:.0f} s")
        model = save_model(scratch / "resnet50.pt")

        loading = [loading_vs_compute(folder, args.loading_images, args.batch_size, w)
                   for w in sorted({0, args.workers})]
        print(table(["workers", "images", "waiting for data s", "in the model s", "total s", "images/s"],
                    [[r["workers"], r["images"], r["wait_s"], r["model_s"], r["total_s"], r["images_per_s"]]
                     for r in loading]))

        pgd_n = max(1, args.pgd_images // CLASSES)
        pgd = run_child(scan_command(model, folder, scratch / "pgd", pgd_n, "clean,pgd", args.batch_size,
                                     ["--attack-opt", "pgd.steps=20"]), args.threads)
        pgd["images"] = pgd_n * CLASSES
        clean = []
        for size in sizes:
            n_per_class = max(1, size // CLASSES)
            run = run_child(scan_command(model, folder, scratch / f"clean{size}", n_per_class, "clean",
                                         args.batch_size), args.threads)
            run["images"] = n_per_class * CLASSES
            clean.append(run)
        print(table(["scan", "images", "seconds", "images/s", "peak RSS MiB"],
                    [[f"clean ({r['images']})", r["images"], f"{r['seconds']:.1f}",
                      f"{r['images'] / r['seconds']:.2f}", f"{r['peak_rss_mib']:.0f}"] for r in clean]
                    + [["clean+pgd-20", pgd["images"], f"{pgd['seconds']:.1f}",
                        f"{pgd['images'] / pgd['seconds']:.3f}", f"{pgd['peak_rss_mib']:.0f}"]]))
        by_size = {r["images"]: r["peak_rss_mib"] for r in clean}
        ratio = None
        if 250 in by_size and 2000 in by_size:
            ratio = by_size[2000] / by_size[250]
            print(f"peak RSS 2000 / 250 images: {ratio:.2f} (issue 17: must be <= 1.3)"
                  + ("" if ratio <= 1.3 else "  <-- FAILS"))
    path = write_result("imagenet_scale", {"machine": info, "loading": loading, "clean": clean, "pgd20": pgd,
                                           "rss_ratio_2000_250": ratio, "batch_size": args.batch_size})
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
