"""Float precision policy on CUDA: TF32 for audits and training, cudnn.benchmark for training.

cuDNN convolutions default to TF32 on Ampere and later GPUs: ~1e-3 relative error, enough
to flip a few per-sample flags against a CPU audit and to make "results do not depend on
batching" only approximate. Audits therefore run exact fp32 (TF32 off for matmuls and
convolutions) unless `--allow-tf32` is given; the choice is recorded in results.json
(`config.tf32`). Training may use TF32 (`--precision tf32`) or bf16 autocast
(`--precision bf16`): a student's weights do not need bitwise fidelity, its audit does.
On the CPU none of this changes anything (the flags only affect CUDA kernels).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def tf32_state() -> dict:
    return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)}


@contextlib.contextmanager
def tf32_policy(allow: bool, *, benchmark: bool = False) -> Iterator[dict]:
    """TF32 on (allow=True) or off for matmuls and cuDNN convolutions, and cudnn.benchmark,
    for the duration; the previous settings come back afterwards. Yields what was set."""
    previous = (tf32_state(), bool(torch.backends.cudnn.benchmark))
    torch.backends.cuda.matmul.allow_tf32 = bool(allow)
    torch.backends.cudnn.allow_tf32 = bool(allow)
    torch.backends.cudnn.benchmark = bool(benchmark)
    try:
        yield {"tf32": bool(allow), "cudnn_benchmark": bool(benchmark)}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous[0]["matmul"]
        torch.backends.cudnn.allow_tf32 = previous[0]["cudnn"]
        torch.backends.cudnn.benchmark = previous[1]


def audit_precision_record(device: torch.device, allow_tf32: bool) -> dict:
    """results.json config.precision: what the audit's float arithmetic was."""
    on_cuda = torch.device(device).type == "cuda"
    return {"dtype": "fp32", "tf32": bool(allow_tf32) and on_cuda,
            "rule": ("TF32 allowed by --allow-tf32 (about 1e-3 relative error in convolutions)"
                     if allow_tf32 and on_cuda else "exact fp32 (TF32 off)" if on_cuda
                     else "exact fp32 (CPU)")}
