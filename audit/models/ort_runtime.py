"""onnxruntime on the device: which execution provider really runs, and I/O binding on CUDA.

Asking onnxruntime for the CUDA provider is not getting it: when the CUDA libraries or the
driver are missing, the session falls back to the CPU with a warning on stderr. So the
session's `get_providers()` is read back, the provider that runs is recorded
(adaptations["onnx"]["provider"]) and a fallback is said in a note.

On CUDA, `run_bound` hands onnxruntime the torch tensor's device memory (I/O binding)
instead of a GPU -> CPU -> numpy -> GPU round trip per call (Square makes thousands of
calls per chunk). The plan of chunks and padding is the same as the numpy path's.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import numpy as np
import torch

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def requested_providers(device: torch.device, available: List[str]) -> list:
    """The providers to ask for on `device` (CUDA first when asked for and built in)."""
    providers: list = [CPU_PROVIDER]
    if device.type == "cuda" and CUDA_PROVIDER in available:
        providers.insert(0, (CUDA_PROVIDER, {"device_id": device.index or 0}))
    return providers


def confirm_provider(session, device: torch.device) -> Tuple[str, Optional[str]]:
    """(the provider the session really runs on, a note when it is not the one asked for)."""
    active = list(session.get_providers())
    provider = active[0] if active else CPU_PROVIDER
    note = None
    if device.type == "cuda" and provider != CUDA_PROVIDER:
        note = (f"onnxruntime's CUDA provider could not start (it runs on {provider}); the ONNX "
                f"model ran on the CPU although --device {device} was given")
        log.warning(note)
    return provider, note


def chunk_plan(batch: int, fixed_batch: Optional[int]) -> List[Tuple[int, int, int]]:
    """(start, stop, padding) per call: whole batch, or chunks of the graph's fixed batch size
    with the last one zero-padded (the padding rows' outputs are dropped)."""
    chunk = fixed_batch or max(batch, 1)
    return [(start, min(start + chunk, batch), max(0, start + chunk - batch)) for start in range(0, batch, chunk)]


_ELEMENT = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}


def run_bound(session, x: torch.Tensor, input_name: str, output_name: str, input_dtype,
              fixed_batch: Optional[int], num_outputs: int) -> torch.Tensor:
    """Logits [B, num_outputs] on x's device, the graph reading and writing device memory."""
    torch_dtype = {np.float32: torch.float32, np.float16: torch.float16, np.float64: torch.float64}[input_dtype]
    device_id = x.device.index or 0
    x = x.detach().to(torch_dtype).contiguous()
    out = torch.empty((x.shape[0], num_outputs), dtype=torch.float32, device=x.device)
    for start, stop, padding in chunk_plan(x.shape[0], fixed_batch):
        part = x[start:stop]
        if padding:
            part = torch.cat([part, part.new_zeros((padding, *part.shape[1:]))])
        result = torch.empty((part.shape[0], num_outputs), dtype=torch.float32, device=x.device)
        binding = session.io_binding()
        binding.bind_input(input_name, "cuda", device_id, input_dtype, tuple(part.shape), part.data_ptr())
        binding.bind_output(output_name, "cuda", device_id, np.float32, tuple(result.shape), result.data_ptr())
        session.run_with_iobinding(binding)
        out[start:stop] = result[:stop - start]
    return out
