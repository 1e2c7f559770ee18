"""A simulated `cuda:0` on the CPU, for testing device discipline without a GPU.

Tensors "on the GPU" are `VirtualCudaTensor`s: storage-less wrapper subclasses
(`torch.Tensor._make_wrapper_subclass`) that report `device == cuda:0` and keep their
values in a CPU tensor (`.elem`). A `TorchDispatchMode` computes every op on the CPU
values and enforces the rules a real GPU would:

- no op mixes a cuda tensor with a CPU tensor of dim > 0 (0-dim CPU tensors are allowed,
  as CUDA allows them: they are scalars);
- a CPU tensor cannot be indexed by cuda indices (CUDA raises; the reverse, a cuda tensor
  indexed by CPU indices, is allowed by CUDA and counted as a host-to-device copy);
- a random op making cuda tensors refuses a CPU `generator=`;
- `.numpy()` raises as on a GPU ("can't convert cuda:0 device type tensor to numpy").

It counts, per call site (the first frame outside torch and this file), the host syncs a
real GPU would stall on: `.item()`/`bool()`/`float()`/`int()` (`_local_scalar_dense`),
`.tolist()`, `.cpu()` and other device-to-host copies, `nonzero`, boolean-mask indexing
and `masked_select` (their output size depends on the data), and host-to-device copies
(`h2d`). `counts(kind)` and `sites(kind)` read them.

Limits: it runs the CPU kernels, so numbers are CPU numbers; autocast, cudnn, streams and
memory do nothing here. That is what tests/test_cuda.py (real CUDA, skipped without it) is
for. torch.cuda's small API (is_available, device_count, synchronize, rng state, memory
stats, ...) is patched for the duration so that code paths taken "on CUDA" run.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
from typing import Counter, Dict, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
aten = torch.ops.aten

# Ops whose output size depends on the values: a real GPU must sync to know it.
_DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                   aten.unique_dim.default, aten.unique_consecutive.default,
                   aten.nonzero_static.default}
_SCALAR_READ = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
              aten._index_put_impl_.default}


class DeviceRuleError(RuntimeError):
    """A rule CUDA would enforce was broken (raised where the real GPU would raise)."""


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


class VirtualCudaTensor(torch.Tensor):
    """A cuda:0 tensor (to Python) whose values live in the CPU tensor `.elem`."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        assert not isinstance(elem, VirtualCudaTensor) and elem.device.type == "cpu"
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, layout=elem.layout, device=CPU, requires_grad=elem.requires_grad)
        out.elem = elem
        return out

    # C++ (autograd's streams, the device guard) sees a CPU tensor, so nothing starts the real
    # CUDA runtime; Python code, which is what decides placement in robaudit, sees cuda:0.
    @property
    def device(self):
        return CUDA

    @property
    def is_cuda(self):
        return True

    @property
    def is_cpu(self):
        return False

    def get_device(self):
        return 0

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self, *, tensor_contents=None):
        return f"VirtualCudaTensor({self.elem!r}, device='cuda:0')"

    def numpy(self, *args, **kwargs):  # what a real GPU tensor says
        raise TypeError("can't convert cuda:0 device type tensor to numpy. "
                        "Use Tensor.cpu() to copy the tensor to host memory first.")

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        with torch._C.DisableTorchFunction():
            elem = self.elem.detach().clone().requires_grad_(self.requires_grad)
        out = VirtualCudaTensor(elem)
        if getattr(self, "_is_param", False):
            out = torch.nn.Parameter(out, requires_grad=self.requires_grad)
        memo[id(self)] = out
        return out

    def __reduce_ex__(self, protocol):
        # torch.save of a GPU tensor copies it to the host; it is written as the CPU values
        # (robaudit loads checkpoints with map_location, so where it was saved does not matter).
        if _ACTIVE:
            _ACTIVE[-1].record("sync", "saved to a file")
        with torch._C.DisableTorchFunction():
            return self.elem.detach().__reduce_ex__(protocol)

    def data_ptr(self):
        return self.elem.data_ptr()

    def untyped_storage(self):
        return self.elem.untyped_storage()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        mode = _ACTIVE[-1] if _ACTIVE else None
        if mode is None:
            raise DeviceRuleError(f"{func} on a virtual cuda tensor outside VirtualCuda")
        return mode.compute(func, args, kwargs or {})


_ACTIVE: list = []


def _call_site() -> str:
    """file:line of the first frame outside torch, the stdlib and this file."""
    frame = sys._getframe(2)
    here = os.path.abspath(__file__)
    torch_dir = os.path.dirname(torch.__file__)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != here and not path.startswith(torch_dir) and "/lib/python3" not in path:
            return f"{os.path.relpath(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: "VirtualCuda"):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.owner.compute(func, args, kwargs or {})


_HOST_DATA = (torch.tensor, torch.as_tensor, torch.asarray)
# Composite ops whose C++ body makes tensors with the input's options (a limit of the mode).
_OPTIONS_COMPOSITES = {"one_hot"}


class _Functions(TorchFunctionMode):
    """Tensor.to / .cuda / .tolist: the Python bindings would start the real CUDA runtime
    (or read device memory) before the dispatcher sees the op, so they are routed here."""

    def __init__(self, owner: "VirtualCuda"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            return self.owner.to(args[0], *args[1:], **kwargs)
        if func is torch.Tensor.cpu:
            return self.owner.to(args[0], CPU)
        if func is torch.Tensor.cuda:
            return self.owner.to(args[0], CUDA, non_blocking=kwargs.get("non_blocking", False))
        if func in (torch.Tensor.tolist, torch.Tensor.__array__) and isinstance(args[0], VirtualCudaTensor):
            if func is torch.Tensor.__array__:
                return args[0].numpy()
            self.owner.record("sync", "tolist")
            with torch._C.DisableTorchFunction():
                return args[0].elem.tolist()
        if func is torch.Tensor.pin_memory:
            return args[0]
        if getattr(func, "__name__", "") in _OPTIONS_COMPOSITES and isinstance(args[0], VirtualCudaTensor):
            # Their C++ bodies build helper tensors from the input's options, which C++ sees
            # as CPU here: computed on the values and wrapped (no gradient flows through them).
            with torch._C.DisableTorchFunction():
                return VirtualCudaTensor(func(args[0].elem, *args[1:], **kwargs))
        if func in _HOST_DATA and _is_cuda(kwargs.get("device")):
            data = args[0] if args else kwargs.get("data")
            if isinstance(data, VirtualCudaTensor):   # already "on the GPU": no host copy
                data = data.elem
            else:
                self.owner.record("h2d", func.__name__)
            with torch._C.DisableTorchFunction():
                out = func(data, *args[1:], **{**kwargs, "device": CPU})
            return out if isinstance(out, VirtualCudaTensor) else VirtualCudaTensor(out)
        return func(*args, **kwargs)


class VirtualCuda:
    """Context manager: simulated cuda:0 on the CPU (module docstring); counts host syncs."""

    def __init__(self):
        self.events: Counter[Tuple[str, str, str]] = collections.Counter()  # (kind, what, site)
        self._stack = contextlib.ExitStack()
        self._rng_state: Optional[torch.Tensor] = None

    # ---- counting ----------------------------------------------------------------------
    def record(self, kind: str, what: str) -> None:
        self.events[(kind, what, _call_site())] += 1

    def counts(self, kind: str = "sync") -> int:
        return sum(n for (k, _, _), n in self.events.items() if k == kind)

    def sites(self, kind: str = "sync") -> Dict[str, int]:
        out: Counter[str] = collections.Counter()
        for (k, what, site), n in self.events.items():
            if k == kind:
                out[f"{site} ({what})"] += n
        return dict(out.most_common())

    def reset(self) -> None:
        self.events.clear()

    # ---- moving tensors ----------------------------------------------------------------
    def to(self, tensor: torch.Tensor, *args, **kwargs):
        if args and isinstance(args[0], torch.Tensor):   # x.to(other): C++ would read other's device as CPU
            other = args[0]
            args = (CUDA if isinstance(other, VirtualCudaTensor) else other.device, other.dtype) + tuple(args[1:])
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        copy = bool(kwargs.get("copy", False))
        target = (CUDA if device.type == "cuda" else device) if device is not None else tensor.device
        if device is not None and device.type == "cuda" and device.index not in (None, 0):
            raise DeviceRuleError(f"virtual CUDA has one device; {device} was asked for")
        dtype = dtype if dtype is not None else tensor.dtype
        if isinstance(tensor, VirtualCudaTensor) and target.type == "cpu":
            self.record("sync", "device-to-host copy")   # C++ would see CPU -> CPU and alias
            with torch._C.DisableTorchFunction():
                out = tensor.elem.to(dtype=dtype, copy=True)
            return out
        memory_format = memory_format if memory_format is not None else torch.preserve_format
        moves = target.type == "cuda" and not isinstance(tensor, VirtualCudaTensor)
        if not moves and not copy and dtype == tensor.dtype and memory_format == torch.preserve_format:
            return tensor                                 # Tensor.to returns self when nothing changes
        with torch._C.DisableTorchFunction():
            return aten._to_copy.default(tensor, dtype=dtype, layout=tensor.layout,
                                         device=CUDA if target.type == "cuda" else target,
                                         non_blocking=non_blocking, memory_format=memory_format)

    # ---- the compute rule --------------------------------------------------------------
    def compute(self, func, args, kwargs):
        leaves = tree_leaves((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        has_cuda = any(isinstance(t, VirtualCudaTensor) for t in tensors)
        wants_cuda = _is_cuda(kwargs.get("device"))
        self._check_rules(func, args, kwargs, tensors, has_cuda or wants_cuda)
        self._count(func, args, kwargs, has_cuda)

        def unwrap(t):
            return t.elem if isinstance(t, VirtualCudaTensor) else t

        new_kwargs = {k: (CPU if k == "device" and _is_cuda(v) else tree_map(unwrap, v)) for k, v in kwargs.items()}
        out = func(*tree_map(unwrap, args), **new_kwargs)
        to_cpu = func in (aten._to_copy.default,) and kwargs.get("device") is not None and not wants_cuda
        if func is aten.copy_.default:       # in place: result is the (possibly wrapped) destination
            return args[0]
        if not (has_cuda or wants_cuda) or to_cpu or func in _SCALAR_READ:
            return out
        if func is aten._to_copy.default and not wants_cuda and kwargs.get("device") is None and not has_cuda:
            return out
        return tree_map(lambda t: VirtualCudaTensor(t) if isinstance(t, torch.Tensor)
                        and not isinstance(t, VirtualCudaTensor) else t, out)

    def _check_rules(self, func, args, kwargs, tensors, on_cuda: bool) -> None:
        if func in (aten._to_copy.default, aten.copy_.default, aten.lift_fresh.default,
                    aten.lift_fresh_copy.default, aten._local_scalar_dense.default):
            return
        if func in _INDEX_OPS:
            self._check_index(func, args)
            return
        if on_cuda:
            cpu = [t for t in tensors if not isinstance(t, VirtualCudaTensor) and t.device.type == "cpu"
                   and t.dim() > 0]
            if cpu:
                raise DeviceRuleError(
                    f"Expected all tensors to be on the same device, but found at least two devices, "
                    f"cuda:0 and cpu! ({func}, CPU tensor of shape {tuple(cpu[0].shape)}, at {_call_site()})")
            generator = kwargs.get("generator")
            if generator is not None and generator.device.type != "cuda":
                raise DeviceRuleError(f"Expected a 'cuda' device type for generator but found "
                                      f"'{generator.device.type}' ({func}, at {_call_site()})")

    def _check_index(self, func, args) -> None:
        target, indices = args[0], [i for i in tree_leaves(args[1]) if isinstance(i, torch.Tensor)]
        values = [v for v in tree_leaves(args[2:]) if isinstance(v, torch.Tensor)]
        if not isinstance(target, VirtualCudaTensor):
            if any(isinstance(i, VirtualCudaTensor) for i in indices) or any(
                    isinstance(v, VirtualCudaTensor) and v.dim() > 0 for v in values):
                raise DeviceRuleError(
                    "indices should be either on cpu or on the same device as the indexed tensor (cpu) "
                    f"({func}, at {_call_site()})")
            return
        for value in values:
            if not isinstance(value, VirtualCudaTensor) and value.dim() > 0:
                raise DeviceRuleError(f"index_put_: values on cpu, destination on cuda:0 (at {_call_site()})")
        if any(not isinstance(i, VirtualCudaTensor) and i.numel() > 1 for i in indices):
            self.record("h2d", "cpu index of a cuda tensor")

    def _count(self, func, args, kwargs, has_cuda: bool) -> None:
        if func is aten._to_copy.default:
            src = args[0]
            if isinstance(src, VirtualCudaTensor) and kwargs.get("device") is not None and not _is_cuda(kwargs["device"]):
                self.record("sync", "device-to-host copy")
            elif not isinstance(src, VirtualCudaTensor) and _is_cuda(kwargs.get("device")) and src.numel() > 1:
                self.record("h2d", "to(cuda)")
            return
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            if isinstance(dst, VirtualCudaTensor) and not isinstance(src, VirtualCudaTensor) and src.numel() > 1:
                self.record("h2d", "copy_ from cpu")
            elif not isinstance(dst, VirtualCudaTensor) and isinstance(src, VirtualCudaTensor):
                self.record("sync", "copy_ to cpu")
            return
        if not has_cuda:
            return
        if func in _SCALAR_READ:
            self.record("sync", "item/bool")
        elif func in _DATA_DEPENDENT:
            self.record("sync", str(func.overloadpacket.__name__))
        elif func is aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
            self.record("sync", "boolean-mask indexing")

    # ---- entering and leaving ----------------------------------------------------------
    def __enter__(self) -> "VirtualCuda":
        stack = self._stack
        patches = {
            "is_available": lambda: True, "device_count": lambda: 1, "_lazy_init": lambda: None,
            "is_initialized": lambda: True, "current_device": lambda: 0, "set_device": lambda d: None,
            "synchronize": lambda device=None: None, "get_device_name": lambda device=None: "virtual cuda:0",
            "get_rng_state": self._get_rng_state, "set_rng_state": self._set_rng_state,
            "manual_seed": lambda seed: None, "manual_seed_all": lambda seed: None,
            "max_memory_allocated": lambda device=None: 0, "reset_peak_memory_stats": lambda device=None: None,
            "empty_cache": lambda: None, "is_bf16_supported": lambda including_emulation=True: True,
        }
        for name, fn in patches.items():
            stack.enter_context(_patch(torch.cuda, name, fn))
            if hasattr(torch.cuda.random, name):   # pyautoattack calls torch.cuda.random.manual_seed
                stack.enter_context(_patch(torch.cuda.random, name, fn))
        stream = type("VirtualStream", (), {"is_capturing": lambda self: False, "synchronize": lambda self: None})()
        stack.enter_context(_patch(torch.accelerator, "current_stream", lambda device=None: stream))
        stack.enter_context(_patch(torch.cuda, "is_current_stream_capturing", lambda: False))
        # Module.to would otherwise set param.data to the wrapper (C++ sees two CPU tensors),
        # losing the subclass; "incompatible" makes it build a new Parameter around it.
        compatible = torch._has_compatible_shallow_copy_type
        stack.enter_context(_patch(torch, "_has_compatible_shallow_copy_type", lambda input, from_: (
            type(input) is type(from_) or not (isinstance(input, VirtualCudaTensor)
                                               or isinstance(from_, VirtualCudaTensor)))
            and compatible(input, from_)))
        _ACTIVE.append(self)
        stack.callback(_ACTIVE.pop)
        stack.enter_context(_Dispatch(self))
        stack.enter_context(_Functions(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _get_rng_state(self, device="cuda"):
        return self._rng_state if self._rng_state is not None else torch.zeros(16, dtype=torch.uint8)

    def _set_rng_state(self, state, device="cuda"):
        self._rng_state = state.clone()


@contextlib.contextmanager
def _patch(owner, name, value):
    missing = object()
    old = owner.__dict__.get(name, missing) if isinstance(owner, type) else getattr(owner, name, missing)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, old)


def enabled_by_env() -> bool:
    return os.environ.get("ROBAUDIT_VIRTUAL_CUDA", "") not in ("", "0")
