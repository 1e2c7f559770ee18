"""Shared helpers of the benchmarks: paths, data, models, machine description, tables.

The benchmarks read the CIFAR-10 subset from ../shared/data/cifar10_subset.npz
(relative to the repository root; --data overrides it) and the models that
benchmarks/train_models.py writes under benchmarks/_models/. Results go to
benchmarks/_results/<name>.json (both folders are git-ignored).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10_subset.npz"
MODELS_DIR = REPO / "benchmarks" / "_models"
RESULTS_DIR = REPO / "benchmarks" / "_results"
EPS = 8 / 255

# Model name -> run_remediate output folder under MODELS_DIR.
MODEL_NAMES = ("natural", "adversarial")
# Export form -> file name inside that folder (as run_remediate writes them).
FORMS = {"pt2": "student.pt2", "torchscript": "student.torchscript.pt", "onnx": "student.onnx"}


def die(message: str, code: int = 2) -> None:
    print(f"{Path(sys.argv[0]).name}: {message}", file=sys.stderr)
    raise SystemExit(code)


def data_path(arg: Optional[str]) -> Path:
    """The .npz to use; exits with one clear line when it is absent."""
    path = Path(arg).expanduser() if arg else DEFAULT_DATA
    if not path.is_file():
        die(f"the CIFAR-10 subset is missing: {path} (expected at ../shared/data/cifar10_subset.npz "
            "beside the repository; pass --data PATH to use another copy)")
    return path


def load_split(path: Path, split: str, limit: Optional[int] = None):
    """robaudit's own loader (the .npz loads as CIFAR-10 with its class names)."""
    from robaudit.audit.data.datasets import load_dataset

    data = load_dataset(str(path), split=split, limit=limit)
    if len(data.classes) != 10:
        die(f"{path} did not load as a 10-class data set ({data.name}, {len(data.classes)} classes)")
    return data


QUICK_MODELS_DIR = MODELS_DIR / "quick"


def models_dir(arg: Optional[str], quick: bool) -> Path:
    """--models-dir, else the full models, else (with --quick) the quick ones."""
    if arg:
        return Path(arg).expanduser()
    if (MODELS_DIR / "natural" / FORMS["pt2"]).is_file() or not quick:
        return MODELS_DIR
    return QUICK_MODELS_DIR


def model_file(name: str, form: str = "pt2", models_dir: Path = MODELS_DIR) -> Path:
    path = models_dir / name / FORMS[form]
    if not path.is_file():
        quick = " --quick" if models_dir == QUICK_MODELS_DIR else ""
        die(f"model {path} is missing: run `python benchmarks/train_models.py{quick}` first")
    return path


def load(name: str, form: str = "pt2", models_dir: Path = MODELS_DIR):
    """robaudit.audit.models.loading.load_model on one exported form, CPU."""
    from robaudit.audit.models.loading import load_model

    return load_model(model_file(name, form, models_dir), device="cpu", num_classes=10)


# ---------------------------------------------------------------------------- machine
def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return None


def loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def add_threads_option(parser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, = the core count). On a shared, "
                             "loaded machine use 1: oversubscribed OpenMP threads make small-batch "
                             "passes 10-40x slower")


def add_model_benchmark_options(parser) -> None:
    """Options shared by the benchmarks that attack the train_models.py models."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="natural,adversarial")
    parser.add_argument("--no-torchattacks", action="store_true")
    parser.add_argument("--data", default=None)
    add_threads_option(parser)
    parser.add_argument("--models-dir", default=None)


def set_threads(n: Optional[int]) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def machine() -> Dict[str, object]:
    import torch

    info: Dict[str, object] = {
        "cpu": _lscpu_model(), "logical_cpus": os.cpu_count(), "ram_gib": _ram_gib(),
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
        "loadavg_start": loadavg(),
    }
    for dist in ("pyautoattack", "torchattacks", "onnxruntime-gpu", "onnxruntime", "onnx2torch"):
        try:
            from importlib import metadata

            info[dist] = metadata.version(dist)
        except Exception:
            pass
    return info


def machine_line(info: Dict[str, object]) -> str:
    return (f"# {info['cpu']}, {info['logical_cpus']} logical CPUs, {info['ram_gib']} GiB RAM, "
            f"torch {info['torch']} ({info['torch_threads']} threads), load avg {info['loadavg_start']}")


# ---------------------------------------------------------------------------- timing / output
def timed(fn: Callable, repeats: int = 1):
    """(last result, [seconds of each run])."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for k, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pct(x: Optional[float], digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def write_result(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {**payload, "loadavg_end": loadavg()}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path
