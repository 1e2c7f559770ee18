"""torchrun scale-out: the same scan with 1 process and with N gloo processes (CPU).

    python benchmarks/bench_torchrun.py [--quick] [--nproc 2] [--n-per-class 20]

Runs `robaudit scan` on the CIFAR-10 subset once as a plain process and once under
`torchrun --nproc-per-node N` with the same threads in total (1 process x N threads vs
N processes x 1 thread), then checks that samples.npz is identical and prints the
wall-time ratio. The model is benchmarks/_models/adversarial (train_models.py) when
present, else a freshly initialised smallcnn exported to .pt2.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scan(cmd_prefix, threads, args, out: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd_prefix, "-m", "robaudit", "scan", *args, "--out", str(out), "--no-report"],
                          capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        common.die(f"scan failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--n-per-class", type=int, default=20)
    parser.add_argument("--attacks", default="clean,fgsm,pgd,cw")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.n_per_class, args.attacks = 4, "clean,pgd"
    data = common.data_path(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = common.MODELS_DIR / "adversarial" / common.FORMS["pt2"]
        if not model.is_file():
            from robaudit.audit.models.architectures import create_architecture
            from robaudit.audit.models.loading import save_export

            torch.manual_seed(0)
            model = tmp / "smallcnn.pt2"
            save_export(create_architecture("smallcnn", 10), str(model), torch.zeros(2, 3, 32, 32))
        scan_args = [str(model), "--dataset", str(data), "--n-per-class", str(args.n_per_class),
                     "--attacks", args.attacks, "--batch-size", "64", "--device", "cpu"]
        single = _scan([sys.executable], args.nproc, scan_args, tmp / "one")
        torchrun = Path(sys.executable).with_name("torchrun")
        multi = _scan([str(torchrun), f"--nproc-per-node={args.nproc}", "--master-addr=127.0.0.1",
                       f"--master-port={_free_port()}"], 1, scan_args, tmp / "many")
        a, b = np.load(tmp / "one" / "samples.npz"), np.load(tmp / "many" / "samples.npz")
        identical = sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)
        n = len(a["y"])
    info = common.machine()
    print(common.machine_line(info))
    print(f"scan of {model.name} on {n} CIFAR-10 subset images, attacks {args.attacks}, batch 64, CPU")
    print(common.table(["run", "wall seconds", "images/s"],
                       [[f"1 process x {args.nproc} threads", f"{single:.1f}", f"{n / single:.1f}"],
                        [f"torchrun {args.nproc} processes x 1 thread", f"{multi:.1f}", f"{n / multi:.1f}"]]))
    print(f"speed-up {single / multi:.2f}x; per-sample results identical: {identical}")
    common.write_result("bench_torchrun" + ("_quick" if args.quick else ""), {
        "machine": info, "n": n, "attacks": args.attacks, "nproc": args.nproc,
        "seconds_single": single, "seconds_torchrun": multi, "identical": identical})
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
