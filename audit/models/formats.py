"""Model file formats: how each one is recognised and read (the registry `load_model` uses).

A format is a `ModelFormat` subclass decorated with `@register_format`:

* `detect(path, head) -> bool`: whether the file at `path`, whose first HEAD_BYTES bytes
  are `head`, is in this format, judged by content, never by name;
* `read(path, options) -> (module, ModelInfo)`: the model as it arrived (its own input
  layout, value range and outputs) and what the reader learned about it
  (audit/models/adapters.py `ModelInfo`). Problems a user can cause end in a one-line UserError,
  and nothing in the file runs unless `options.trust_pickle`.

`pick_format` uses a forced format as given, or tries the formats in `order` (lowest
first) and takes the first that detects the file; messages list them in that order too:

  10 torchscript  zip archive with ``<root>/constants.pkl`` or ``<root>/code/...``
  20 export       zip archive with ``<root>/archive_format`` or ``<root>/models/*.json`` (.pt2)
  30 state_dict   a torch.save file: zip archive with ``<root>/data.pkl`` (and no export or
  40 checkpoint     TorchScript member), or a legacy (pre-1.6) torch.save pickle
  50 pickle       the same, and plain pickles (``\\x80`` + protocol 2-5; only with trust_pickle)
  60 onnx         none of the others' containers, and parses as an ONNX ModelProto with a
                  non-empty graph
  70 safetensors  8-byte little-endian header length followed by ``{``

The built-in formats recognise disjoint containers (`container_kind`), so their order
only matters for formats added with a lower `order`. The exception is the torch.save
file, which does not say what it holds until it is unpickled: state_dict, checkpoint and
pickle share one reader (`read_torch_save`), and the content decides which of the three
the file is, whether the format was detected or forced. It is opened with
``torch.load(weights_only=True)`` unless trust_pickle: a flat mapping of tensors ->
"state_dict"; a dict holding one under a key such as ``state_dict`` / ``model`` / ``net``
/ ``model_state_dict`` / ``ema`` -> "checkpoint"; an nn.Module (only loadable with
trust_pickle) -> "pickle".
"""

from __future__ import annotations

import abc
import os
import pickle
import struct
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from robaudit.audit.models import arch_inference
from robaudit.audit.models.adapters import FixedBatchModule, ModelInfo, first_line
from robaudit.audit.models.timm_build import timm_from_weights
from robaudit.errors import UserError
from robaudit.registry import Registry

MODEL_FORMATS = Registry("model format")
HEAD_BYTES = 16
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
WEIGHT_FORMATS = ("state_dict", "checkpoint", "safetensors")
# Keys under which training code commonly stores the model's weights in a checkpoint,
# in the order they are preferred when several are present.
CHECKPOINT_WEIGHT_KEYS = ("state_dict", "model_state_dict", "model", "net", "ema",
                          "ema_state_dict", "state_dict_ema", "model_ema", "network", "module")
# Prefixes wrappers add to every key: DataParallel/DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_PICKLE_REFUSAL = ("{path} contains pickled Python objects; robaudit did not execute it. "
                   "Pass --trust-pickle only if you trust its source (or re-save the model as a "
                   "state_dict, safetensors or torch.export .pt2 file)")


@dataclass
class ReadOptions:
    """What a reader may use besides the file (from load_model's arguments)."""
    arch: Optional[str] = None          # architecture for a weights-only file (a checked name or timm:NAME)
    num_classes: Optional[int] = None   # the dataset's class count, when known
    trust_pickle: bool = False          # allow unpickling arbitrary objects (runs their code)
    device: str = "cpu"
    # Without arch, tells same-key architecture forms apart on a probe batch (load_model's
    # probe_data; audit/models/arch_inference.py decide_by_probe); None: such files are refused.
    score_candidate: Optional[arch_inference.CandidateScorer] = None


class ModelFormat(abc.ABC):
    """One model file format; subclass, set `name` and `order`, decorate with @register_format."""
    name: ClassVar[str] = ""
    order: ClassVar[int] = 100          # detection (and listing) order: lowest first

    @abc.abstractmethod
    def detect(self, path: str, head: bytes) -> bool:
        """Whether the file (its first HEAD_BYTES bytes: `head`) is in this format; never raises."""

    @abc.abstractmethod
    def read(self, path: str, options: ReadOptions) -> Tuple[nn.Module, ModelInfo]:
        """(the model as it arrived, what the reader learned); one-line UserError for user mistakes."""


def register_format(cls):
    """Class decorator: add a ModelFormat subclass to MODEL_FORMATS under its `name` (help: its docstring)."""
    MODEL_FORMATS.register(cls.name)(cls)
    return cls


def formats_in_order() -> List[ModelFormat]:
    return sorted((MODEL_FORMATS.create(n) for n in MODEL_FORMATS.names()), key=lambda f: (f.order, f.name))


def format_names() -> List[str]:
    return [f.name for f in formats_in_order()]


def read_head(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(HEAD_BYTES)


def pick_format(path: str, name: str = "auto") -> ModelFormat:
    """The format `name`, or with "auto" the first (in `order`) that detects the file."""
    if name != "auto":
        return MODEL_FORMATS.create(name)
    head = read_head(path)
    for fmt in formats_in_order():
        if fmt.detect(path, head):
            return fmt
    raise unknown_format_error(path, head)


def unknown_format_error(path: str, head: bytes) -> UserError:
    """The one line saying why no format recognises the file."""
    if head.startswith(ZIP_MAGICS):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            return UserError(f"{path} is truncated or corrupt (unreadable zip archive: {err})")
        return UserError(f"{path} is a zip archive but not a torch.save, TorchScript or torch.export file")
    if path.lower().endswith(".onnx"):
        return UserError(f"{path} is not a readable ONNX model (truncated or corrupt?)")
    return UserError(f"cannot tell the format of {path}: not a torch.save / TorchScript / torch.export "
                     f"archive, safetensors or ONNX file (truncated or corrupt?); pass --format "
                     f"one of {', '.join(format_names())}")


# --- containers ------------------------------------------------------------------------

def zip_kind(path: str) -> str:
    """"export", "torchscript" or "torch.save" for a zip archive torch wrote, else "zip"."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError):
        return "zip"
    members = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if "archive_format" in members or any(m.startswith("models/") and m.endswith(".json") for m in members):
        return "export"
    if "constants.pkl" in members or any(m.startswith("code/") for m in members):
        return "torchscript"
    return "torch.save" if "data.pkl" in members else "zip"


def is_plain_pickle(head: bytes) -> bool:
    """A pickle written by pickle.dump rather than torch.save (zip or legacy format)."""
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5
            and not (head[2:4] == b"\x8a\x0a"
                     and int.from_bytes(head[4:14], "little") == _TORCH_LEGACY_MAGIC))


def container_kind(path: str, head: bytes) -> Optional[str]:
    """What the first bytes say: zip_kind's answer for a zip archive, "torch.save" (legacy)
    or "pickle" for a pickle, "safetensors", or None."""
    if head.startswith(ZIP_MAGICS):
        return zip_kind(path)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle" if is_plain_pickle(head) else "torch.save"
    if len(head) >= 9:
        header_len = struct.unpack("<Q", head[:8])[0]
        if head[8:9] == b"{" and 0 < header_len <= os.path.getsize(path) - 8:
            return "safetensors"
    return None


# --- whole models ----------------------------------------------------------------------

@register_format
class TorchScriptFormat(ModelFormat):
    """TorchScript archive (torch.jit.save); deprecated in torch >= 2.10, still read"""
    name, order = "torchscript", 10

    def detect(self, path: str, head: bytes) -> bool:
        return container_kind(path, head) == "torchscript"

    def read(self, path: str, options: ReadOptions) -> Tuple[nn.Module, ModelInfo]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                module = torch.jit.load(path, map_location=options.device)
            except Exception as err:
                raise UserError(f"could not read {path} as TorchScript: {first_line(err)}") from None
        deprecation = next((str(w.message) for w in caught
                            if issubclass(w.category, (DeprecationWarning, FutureWarning))), None)
        note = ("TorchScript is deprecated in torch >= 2.10"
                + (f" (torch said: {deprecation})" if deprecation else "")
                + "; robaudit still loads it, but re-save the model as a torch.export .pt2")
        return module, ModelInfo(format=self.name, notes=[note])


class ExportedModule(nn.Module):
    """Holds a torch.export program's module, whose train/eval mode was fixed at export
    time and which raises on .eval(): this wrapper makes .eval()/.train() harmless."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def train(self, mode: bool = True) -> "ExportedModule":
        self.training = mode  # deliberately not propagated
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def _exported_input_shape(program) -> Optional[List[Any]]:
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor):
                # Symbolic sizes (dynamic dimensions) are shown as B for the batch, ? elsewhere.
                return [d if isinstance(d, int) else ("B" if i == 0 else "?")
                        for i, d in enumerate(value.shape)]
    return None


@register_format
class ExportFormat(ModelFormat):
    """torch.export program (.pt2, torch.export.save): the format robaudit recommends and writes"""
    name, order = "export", 20

    def detect(self, path: str, head: bytes) -> bool:
        return container_kind(path, head) == "export"

    def read(self, path: str, options: ReadOptions) -> Tuple[nn.Module, ModelInfo]:
        try:
            program = torch.export.load(path)
        except Exception as err:
            raise UserError(f"could not read {path} as a torch.export program: {first_line(err)}") from None
        if torch.device(options.device).type != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, options.device)
        declared = _exported_input_shape(program)
        module: nn.Module = ExportedModule(program.module())
        info = ModelInfo(format=self.name, declared_input_shape=declared, on_device=True)
        if declared and isinstance(declared[0], int):
            module = FixedBatchModule(module, declared[0])
            info.fixed_batch, info.batch_chunked = declared[0], True
            info.notes.append(f"the exported program has a fixed batch size of {declared[0]}; "
                              f"robaudit feeds it in chunks of that size")
        return module, info


@register_format
class OnnxFormat(ModelFormat):
    """ONNX model: onnxruntime forward; onnx2torch for gradients where it is faithful"""
    name, order = "onnx", 60

    def detect(self, path: str, head: bytes) -> bool:
        if container_kind(path, head) is not None:
            return False
        from robaudit.audit.models.onnx_support import read_model_proto

        try:
            read_model_proto(path)
        except UserError:
            return False
        return True

    def read(self, path: str, options: ReadOptions) -> Tuple[nn.Module, ModelInfo]:
        from robaudit.audit.models.onnx_support import read_onnx

        return read_onnx(path, device=options.device)


# --- torch.save files and weights ------------------------------------------------------

def torch_load(path: str, trust_pickle: bool) -> Any:
    # Loaded on the CPU: the module is moved to the device once it is built.
    if trust_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise UserError(f"could not read {path} with torch.load: {first_line(err)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses any global outside its allowlist before calling it.
        if "weights_only" in str(err) or "Weights only" in str(err):
            raise UserError(_PICKLE_REFUSAL.format(path=path)) from None
        raise UserError(f"{path} is truncated or corrupt ({first_line(err)})") from None
    except Exception as err:
        raise UserError(f"could not read {path} with torch.load: {first_line(err)}") from None


def _load_plain_pickle(path: str, trust_pickle: bool) -> Any:
    """There is no weights-only reader for plain pickles, so they only open with trust_pickle."""
    if not trust_pickle:
        raise UserError(_PICKLE_REFUSAL.format(path=path))
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle)
    except Exception as err:
        raise UserError(f"could not unpickle {path}: {first_line(err)}") from None


def _is_tensor_mapping(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def unwrap_checkpoint(obj: Any, path: str, notes: List[str]) -> Tuple[str, Any]:
    """(format, state_dict or nn.Module) from what torch.load returned."""
    if isinstance(obj, nn.Module):
        return "pickle", obj
    if _is_tensor_mapping(obj):
        return "state_dict", obj
    if isinstance(obj, Mapping):
        for key in CHECKPOINT_WEIGHT_KEYS:
            value = obj.get(key)
            if _is_tensor_mapping(value) or isinstance(value, nn.Module):
                others = [k for k in CHECKPOINT_WEIGHT_KEYS if k != key and k in obj]
                notes.append(f"weights taken from checkpoint key {key!r}"
                             + (f" (also present: {', '.join(map(repr, others))})" if others else ""))
                return ("pickle" if isinstance(value, nn.Module) else "checkpoint"), value
        candidates = [k for k, v in obj.items() if _is_tensor_mapping(v)]
        if len(candidates) == 1:
            notes.append(f"weights taken from checkpoint key {candidates[0]!r}")
            return "checkpoint", obj[candidates[0]]
        keys = ", ".join(map(str, list(obj)[:8]))
        raise UserError(f"{path} is a dict without model weights under any of "
                        f"{', '.join(CHECKPOINT_WEIGHT_KEYS[:5])}, ...; its keys are: {keys}")
    raise UserError(f"{path} holds a {type(obj).__name__}, not a model, a state_dict or a checkpoint dict")


def read_torch_save(path: str, options: ReadOptions) -> Tuple[nn.Module, ModelInfo]:
    """The reader of state_dict, checkpoint and pickle: what the file holds decides which."""
    notes: List[str] = []
    if is_plain_pickle(read_head(path)):
        obj = _load_plain_pickle(path, options.trust_pickle)
    else:
        obj = torch_load(path, options.trust_pickle)
    kind, loaded = unwrap_checkpoint(obj, path, notes)
    if kind != "pickle":
        return model_from_weights(loaded, kind, path, options, notes)
    if not isinstance(loaded, nn.Module):
        raise UserError(f"{path} holds a pickled {type(loaded).__name__}, not an nn.Module")
    return loaded, ModelInfo(format="pickle", notes=notes)


class TorchSaveFormat(ModelFormat):
    """Base of the three formats a torch.save file can be in (see the module docstring)."""

    def detect(self, path: str, head: bytes) -> bool:
        return container_kind(path, head) == "torch.save"

    def read(self, path: str, options: ReadOptions) -> Tuple[nn.Module, ModelInfo]:
        return read_torch_save(path, options)


@register_format
class StateDictFormat(TorchSaveFormat):
    """torch.save'd state_dict: weights only, loaded into --arch (or the architecture they fit)"""
    name, order = "state_dict", 30


@register_format
class CheckpointFormat(TorchSaveFormat):
    """torch.save'd training checkpoint (a dict holding a state_dict): loaded into --arch (or the one it fits)"""
    name, order = "checkpoint", 40


@register_format
class PickleFormat(TorchSaveFormat):
    """a pickled nn.Module (torch.save or pickle.dump): read only with --trust-pickle"""
    name, order = "pickle", 50

    def detect(self, path: str, head: bytes) -> bool:
        return container_kind(path, head) in ("torch.save", "pickle")


@register_format
class SafetensorsFormat(ModelFormat):
    """safetensors weights: loaded into --arch (or the architecture they fit)"""
    name, order = "safetensors", 70

    def detect(self, path: str, head: bytes) -> bool:
        return container_kind(path, head) == "safetensors"

    def read(self, path: str, options: ReadOptions) -> Tuple[nn.Module, ModelInfo]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"{path} is truncated or corrupt (safetensors: {first_line(err)})") from None
        if not state:
            raise UserError(f"{path} is a safetensors file without tensors")
        return model_from_weights(state, self.name, path, options, [])


def _strip_wrapper_prefixes(state: Mapping[str, torch.Tensor], notes: List[str]) -> Dict[str, torch.Tensor]:
    state = dict(state)
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                notes.append(f"stripped the {prefix!r} prefix from every weight name")
                stripped = True
    return state


def model_from_weights(state: Mapping[str, torch.Tensor], kind: str, path: str, options: ReadOptions,
                       notes: List[str]) -> Tuple[nn.Module, ModelInfo]:
    """Weights (format `kind`) loaded into options.arch, which they must fit exactly, or
    without it into the architecture their keys and shapes say (audit/models/arch_inference.py);
    a `timm:NAME` arch is built by timm (audit/models/timm_build.py `timm_from_weights`)."""
    state = _strip_wrapper_prefixes(state, notes)
    complex_key = next((k for k, v in state.items() if v.is_complex()), None)
    if complex_key is not None:   # load_state_dict would drop the imaginary part with only a warning
        raise UserError(f"{path}: weight {complex_key!r} holds complex numbers ({state[complex_key].dtype}); "
                        f"model weights must be real")
    if options.arch is not None and options.arch.lower().startswith("timm:"):
        return timm_from_weights(state, kind, path, options, notes)
    # RobustBench-style mu/sigma buffers move to the boundary: normalised once, recorded there.
    state, file_norm = arch_inference.split_normalization_buffers(state)
    if file_norm is not None:
        notes.append(f"mu/sigma buffers taken out of the weights: {arch_inference.FILE_NORMALIZATION_SOURCE} "
                     f"are the input normalisation")

    def make_info(arch: str, boundary_norm: Optional[dict]) -> ModelInfo:
        return ModelInfo(format=kind, arch=arch, notes=notes, input_normalization=boundary_norm)

    # A head's class count is read from the weights, so a CIFAR-100 checkpoint loads into a
    # 100-class head and a wrong --dataset is reported as a class mismatch, not a shape error.
    if options.arch is None:
        fit, module, boundary_norm, record = arch_inference.infer_architecture(
            state, kind, path, options.num_classes or 10, file_norm, make_info,
            options.score_candidate, notes)
        info = make_info(fit.name, boundary_norm)
        info.arch_inferred = record
        return module, info
    arch = options.arch
    fit = arch_inference.fit_architecture(arch, state, options.num_classes or 10)
    if not fit.exact:
        raise arch_inference.mismatch_error(fit, path)
    twins = arch_inference.same_key_twins(arch, state, fit.num_classes)
    if twins:
        notes.append(f"the weights also fit {', '.join(twins)} (same keys, different forward); "
                     f"--arch {arch} used as given")
    module = arch_inference.build_with_weights(arch, state, fit.num_classes)
    boundary_norm = arch_inference.reconcile_own_normalization(module, file_norm, path, notes)
    return module, make_info(arch, boundary_norm)
