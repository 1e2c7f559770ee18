"""onnxruntime on the device: which execution provider really runs, and I/O binding on CUDA.

Asking onnxruntime for the CUDA provider is not getting it: when the CUDA libraries or the
driver are missing, the session falls back to the CPU with a warning on stderr. So the
session's `get_providers()` is read back, the provider that runs is recorded
(adaptations["onnx"]["provider"]) and a fallback is said in a note.

On CUDA, `run_bound` hands onnxruntime the torch tensor's device memory (I/O binding)
instead of a GPU -> CPU -> numpy -> GPU round trip per call (Square makes thousands of
calls per chunk). The plan of chunks and padding is the same as the numpy path's.

`OnnxRuntimeModule` is the forward-only nn.Module around a session (black-box attacks and
the replay of failures on the shipped graph use it).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

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


class _NoGradient(torch.autograd.Function):
    """Passes onnxruntime's logits through; backward explains why there is no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits.clone()

    @staticmethod
    def backward(ctx, grad_output):
        raise RuntimeError(
            "this ONNX model runs in onnxruntime without gradients (white_box=False); "
            "only black-box attacks can run on it")


class OnnxRuntimeModule(nn.Module):
    """Forward-only nn.Module around an onnxruntime session: model-layout input -> one output.

    The output is `output_name` (default: the graph's first output). A graph exported with
    a fixed batch size is fed in chunks of that size (the last one zero-padded), so any
    batch size works.
    """

    def __init__(self, path: str, device: str = "cpu", output_name: Optional[str] = None,
                 share_cpu: bool = False):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # onnxruntime's warnings are not the user's problem
        if share_cpu:  # next to torch (the replay): torch's thread count, and no spin-waiting
            # threads that would keep the cores busy while torch attacks the next chunk
            options.intra_op_num_threads = torch.get_num_threads()
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        device = torch.device(device)
        providers = requested_providers(device, ort.get_available_providers())
        self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
        self.provider, self.provider_note = confirm_provider(self.session, device)
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_name = output_name or self.output_names[0]
        self.declared_input_shape = list(model_input.shape)
        self.input_dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                            "tensor(double)": np.float64}.get(model_input.type, np.float32)
        batch = self.declared_input_shape[0] if self.declared_input_shape else None
        self.fixed_batch: Optional[int] = batch if isinstance(batch, int) and batch > 0 else None

    def _chunks(self, x: torch.Tensor, names: Optional[List[str]]) -> List[List[Any]]:
        """Per output in `names` (None: all), the list of per-chunk results."""
        inputs = x.detach().to("cpu", torch.float32).numpy().astype(self.input_dtype, copy=False)
        chunk = self.fixed_batch or max(len(inputs), 1)
        per_output: List[List[Any]] = []
        for start in range(0, len(inputs), chunk):
            part = inputs[start:start + chunk]
            short = chunk - len(part)
            if short:
                part = np.concatenate([part, np.zeros((short,) + part.shape[1:], part.dtype)])
            results = self.session.run(names, {self.input_name: np.ascontiguousarray(part)})
            if not per_output:
                per_output = [[] for _ in results]
            for store, value in zip(per_output, results):
                store.append(value[:chunk - short] if isinstance(value, np.ndarray) and value.ndim else value)
        return per_output

    def run_all(self, x: torch.Tensor) -> Dict[str, Any]:
        """Every output of the graph on x: name -> tensor (float32 for floats), or the raw value."""
        outputs: Dict[str, Any] = {}
        for name, parts in zip(self.output_names, self._chunks(x, None)):
            if all(isinstance(p, np.ndarray) for p in parts):
                value = torch.from_numpy(np.concatenate(parts) if parts[0].ndim else parts[0])
                outputs[name] = value.float() if value.is_floating_point() else value
            else:
                outputs[name] = parts[0]
        return outputs

    def _bound_columns(self) -> Optional[int]:
        """The output's class count when I/O binding can run (CUDA provider, float output with a
        declared class count), else None (the numpy path)."""
        if self.provider != CUDA_PROVIDER:
            return None
        output = next(o for o in self.session.get_outputs() if o.name == self.output_name)
        shape = list(output.shape or [])
        ok = output.type == "tensor(float)" and len(shape) == 2 and isinstance(shape[1], int)
        return shape[1] if ok else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        columns = self._bound_columns() if x.device.type == "cuda" else None
        if columns is not None:
            logits = run_bound(self.session, x, self.input_name, self.output_name, self.input_dtype,
                                           self.fixed_batch, columns)
            return _NoGradient.apply(x, logits) if x.requires_grad and torch.is_grad_enabled() else logits
        parts = self._chunks(x, [self.output_name])[0]
        logits = torch.from_numpy(np.concatenate(parts).astype(np.float32, copy=False)).to(x.device)
        if x.requires_grad and torch.is_grad_enabled():
            return _NoGradient.apply(x, logits)
        return logits
