"""benchmarks/gpu_check.sh --tiny: the whole prepared device check on the CPU (issue 26).

Every part must print its one JSON line and pass; the CPU-only figures that are exact by
construction are checked too (same device, same batches: no flips, a bitwise resume).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

PARTS = ["cuda_tests", "pgd", "absld", "compile", "aa", "nccl", "ort", "resume"]


@pytest.mark.slow   # seven processes each import torch and robaudit: ~60-90 s on 2 shared cores
def test_gpu_check_tiny_runs_every_part_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--tiny", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["part"] for line in lines] == PARTS, proc.stderr[-2000:]
    failed = [line for line in lines if not line["ok"]]
    assert not failed and proc.returncode == 0, failed
    by_part = {line["part"]: line for line in lines}
    # CPU vs CPU, the same batches and kernels: TF32 does nothing there, so no flag moves.
    assert by_part["pgd"]["flips_vs_cpu_tf32_off"] == by_part["pgd"]["flips_vs_cpu_tf32_on"] == 0
    assert by_part["resume"]["bitwise_equal"] is True
    assert by_part["nccl"]["backend"] == "gloo" and by_part["nccl"]["all_reduce_ok"]
    assert by_part["ort"]["max_abs_diff_vs_cpu"] == 0.0      # the same CPU session twice
    assert set(by_part["absld"]) >= {"bf16", "fp32"}
    assert set(by_part["compile"]) >= {"bf16", "bf16+compile"} and by_part["compile"]["backend"] == "aot_eager"
    assert all(by_part["aa"][f"{c}_images_per_s"] > 0 for c in ("apgd-ce", "apgd-t", "fab-t", "square"))
