"""Load a classifier from a file, whatever its format, and check it before attacking it.

`load_model` detects the format from the file's content (not its name), loads it
without executing untrusted code, puts it in eval mode on the device, adapts its
boundary (input range, normalisation, layout, fixed batch, output choice and kind,
class order: audit/adapters.py) so that it takes NCHW images in [0, 1] and returns
logits in dataset class order, and runs forward passes on an all-zero batch and on a
random probe batch to check the model can be audited: every problem a user can cause
ends in a one-line UserError. What was adapted, and why, goes to `adaptations`.

Format detection (`format="auto"`), in this order:

* zip archive (``PK\\x03\\x04``):
  - a member ``<root>/archive_format`` or ``<root>/models/*.json`` -> "export" (torch.export .pt2)
  - a member ``<root>/constants.pkl`` or ``<root>/code/...`` -> "torchscript"
  - a member ``<root>/data.pkl`` -> a torch.save pickle, classified by its content below
* legacy (pre-1.6) torch.save file (pickle with torch's magic number) -> classified below
* other pickle (``\\x80`` + protocol 2-5) -> "pickle" (only with trust_pickle)
* 8-byte little-endian header length followed by ``{`` -> "safetensors"
* anything that parses as an ONNX ModelProto with a non-empty graph -> "onnx"

A torch.save file is opened with ``torch.load(weights_only=True)`` unless trust_pickle:
a flat mapping of tensors -> "state_dict"; a dict holding one under a key such as
``state_dict`` / ``model`` / ``net`` / ``model_state_dict`` / ``ema`` -> "checkpoint";
an nn.Module (only loadable with trust_pickle) -> "pickle".
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import struct
import time
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from robaudit.audit import adapters
from robaudit.audit.adapters import BoundaryModel, FixedBatchModule, SelectOutput  # noqa: F401 (re-exported)
from robaudit.audit.architectures import ARCHITECTURES, check_architecture, create_architecture
from robaudit.errors import UserError

FORMATS = ("torchscript", "export", "state_dict", "checkpoint", "pickle", "onnx", "safetensors")
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
# Spatial sizes tried when the model rejects the requested input shape, to tell the user
# what it seems to need; probing stops after this many seconds.
_PROBE_SIZES = (32, 28, 64, 96, 224, 299)
_PROBE_BUDGET_S = 10.0


@dataclass
class LoadedModel:
    module: torch.nn.Module        # [0,1] NCHW float32 in -> logits [B, C] out; eval mode; on device
    format: str                    # torchscript|export|state_dict|checkpoint|pickle|onnx|safetensors
    path: str
    sha256: str
    num_params: Optional[int]
    arch: Optional[str]
    white_box: bool                # False: gradients not trustworthy/available -> only black-box attacks
    adaptations: dict              # see docs/results-schema.md model.adaptations
    refusal: Optional[str]         # why white-box attacks are refused (one line), when white_box is False
    num_classes: Optional[int] = None   # C, from the zero-batch forward check
    class_names: Optional[List[str]] = None  # from --class-names: replace the dataset's names


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


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_export(module: nn.Module, path: str, example_input: torch.Tensor) -> None:
    """Write `module` as a torch.export .pt2 (the format robaudit recommends and writes).

    Exported in eval mode with a dynamic batch dimension where the model allows it
    (otherwise with the example's batch size, which `load_model` then feeds in chunks).
    The file is written next to `path` and renamed into place, so it is never half-written.
    """
    # Each submodule's mode is restored on its own: a wrapper built around an eval-mode
    # model is in training mode, and restoring it recursively would flip the model too.
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    # A slice of a big tensor would save its whole storage as the program's sample input.
    example_input = example_input.detach().clone().contiguous()
    try:
        if example_input.shape[0] < 2:  # a batch of 1 would make torch.export specialise it
            example_input = example_input.expand(2, *example_input.shape[1:]).contiguous()
        try:
            program = torch.export.export(
                module, (example_input,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        except Exception:  # the model fixes its batch size somewhere: export it as it is
            program = torch.export.export(module, (example_input,))
        directory, name = os.path.split(os.path.abspath(path))
        temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp.pt2")
        torch.export.save(program, temporary)
        os.replace(temporary, path)
    finally:
        for submodule, mode in modes:
            submodule.training = mode


# --- format detection ------------------------------------------------------------------

def _zip_kind(path: str) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise UserError(f"{path} is truncated or corrupt (unreadable zip archive: {err})") from None
    members = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if "archive_format" in members or any(m.startswith("models/") and m.endswith(".json") for m in members):
        return "export"
    if "constants.pkl" in members or any(m.startswith("code/") for m in members):
        return "torchscript"
    if "data.pkl" in members:
        return "torch_pickle"
    raise UserError(f"{path} is a zip archive but not a torch.save, TorchScript or torch.export file")


def _detect_kind(path: str) -> str:
    """One of FORMATS, or "torch_pickle" (a torch.save file whose content decides)."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    size = os.path.getsize(path)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _zip_kind(path)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle" if _is_plain_pickle(path) else "torch_pickle"
    if len(head) >= 9:
        header_len = struct.unpack("<Q", head[:8])[0]
        if head[8:9] == b"{" and 0 < header_len <= size - 8:
            return "safetensors"
    try:
        from robaudit.audit.onnx_support import _read_model_proto

        _read_model_proto(path)
        return "onnx"
    except UserError:
        pass
    if path.lower().endswith(".onnx"):
        raise UserError(f"{path} is not a readable ONNX model (truncated or corrupt?)")
    raise UserError(f"cannot tell the format of {path}: not a torch.save / TorchScript / torch.export "
                    f"archive, safetensors or ONNX file (truncated or corrupt?); pass --format "
                    f"one of {', '.join(FORMATS)}")


# --- readers ---------------------------------------------------------------------------

def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    # TorchScript puts a generic header first and the actual error last.
    return (lines[-1] if "TorchScript interpreter" in lines[0] else lines[0])[:200]


def _torch_load(path: str, trust_pickle: bool) -> Any:
    # Loaded on the CPU: the module is moved to the device once it is built.
    if trust_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise UserError(f"could not read {path} with torch.load: {_first_line(err)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses any global outside its allowlist before calling it.
        if "weights_only" in str(err) or "Weights only" in str(err):
            raise UserError(_PICKLE_REFUSAL.format(path=path)) from None
        raise UserError(f"{path} is truncated or corrupt ({_first_line(err)})") from None
    except Exception as err:
        raise UserError(f"could not read {path} with torch.load: {_first_line(err)}") from None


def _is_tensor_mapping(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def _unwrap_checkpoint(obj: Any, path: str, notes: List[str]) -> Tuple[str, Any]:
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


def _head_out_features(module: nn.Module, state: Mapping[str, torch.Tensor]) -> Optional[int]:
    """Class count the weights' final Linear layer was trained with, if it has one."""
    linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    weight = state.get(f"{linears[-1]}.weight")
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None


def _summarise(keys: List[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")


def _module_from_weights(state: Mapping[str, torch.Tensor], arch: str, num_classes: Optional[int],
                         path: str) -> nn.Module:
    # A meta-device probe reads the head's class count from the weights, so a CIFAR-100
    # checkpoint loads into a 100-class head and a wrong --dataset is reported as a class
    # mismatch rather than as a shape error.
    with torch.device("meta"):
        probe = create_architecture(arch, num_classes=num_classes or 10)
    classes = _head_out_features(probe, state) or num_classes or 10
    module = create_architecture(arch, num_classes=classes)
    adapt = getattr(module, "adapt_to_state_dict", None)
    if adapt is not None:
        adapt(list(state))
    expected = module.state_dict()
    # Checkpoints from before torch 0.4.1 lack BatchNorm's num_batches_tracked, which eval ignores.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k}: file {list(state[k].shape)}, arch {list(expected[k].shape)}"
                   for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_summarise(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_summarise(unexpected)})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} with another shape ({_summarise(wrong_shape, 2)})")
        raise UserError(f"weights in {path} do not match arch {arch!r}: {'; '.join(parts)}; "
                        f"check --arch")
    module.load_state_dict(state, strict=False)
    return module


def _load_safetensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is truncated or corrupt (safetensors: {_first_line(err)})") from None
    if not state:
        raise UserError(f"{path} is a safetensors file without tensors")
    return state


def _load_torchscript(path: str, device: str, notes: List[str]) -> nn.Module:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            module = torch.jit.load(path, map_location=device)
        except Exception as err:
            raise UserError(f"could not read {path} as TorchScript: {_first_line(err)}") from None
    deprecation = next((str(w.message) for w in caught
                        if issubclass(w.category, (DeprecationWarning, FutureWarning))), None)
    notes.append("TorchScript is deprecated in torch >= 2.10"
                 + (f" (torch said: {deprecation})" if deprecation else "")
                 + "; robaudit still loads it, but re-save the model as a torch.export .pt2")
    return module


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


def _load_export(path: str, device: str, notes: List[str]) -> Tuple[nn.Module, Optional[List[Any]]]:
    try:
        program = torch.export.load(path)
    except Exception as err:
        raise UserError(f"could not read {path} as a torch.export program: {_first_line(err)}") from None
    if torch.device(device).type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    declared = _exported_input_shape(program)
    module: nn.Module = ExportedModule(program.module())
    if declared and isinstance(declared[0], int):
        module = FixedBatchModule(module, declared[0])
        notes.append(f"the exported program has a fixed batch size of {declared[0]}; "
                     f"robaudit feeds it in chunks of that size")
    return module, declared


# --- checks ----------------------------------------------------------------------------

def _check_mean_std(mean, std, channels: int) -> Tuple[List[float], List[float]]:
    if (mean is None) != (std is None):
        raise UserError("pass both --mean and --std (or neither)")
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    for name, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise UserError(f"--{name} needs 1 or {channels} values (one per input channel), got {len(values)}")
        if not all(math.isfinite(v) for v in values):
            raise UserError(f"--{name} values must be finite numbers")
    if any(v <= 0 for v in std):
        raise UserError("--std values must be positive")
    if len(mean) != len(std):
        mean = mean * channels if len(mean) == 1 else mean
        std = std * channels if len(std) == 1 else std
    return mean, std


def _first_conv_channels(module: nn.Module) -> Optional[int]:
    try:
        for param in module.parameters():
            if param.ndim == 4:
                return int(param.shape[1])
    except Exception:
        pass
    return None


def _guess_input_shape(module: nn.Module, tried: Tuple[int, ...], device: str) -> Optional[Tuple[int, ...]]:
    channels = _first_conv_channels(module) or tried[0]
    deadline = time.monotonic() + _PROBE_BUDGET_S
    for size in _PROBE_SIZES:
        shape = (channels, size, size)
        if shape == tuple(tried):
            continue
        if time.monotonic() > deadline:
            break
        try:
            with torch.no_grad():
                out = module(torch.zeros((2, *shape), device=device))
            if isinstance(out, torch.Tensor) and out.ndim == 2:
                return shape
        except Exception:
            continue
    return None


def _zero_forward(boundary: BoundaryModel, input_shape: Tuple[int, ...], device: str,
                  declared: Optional[List[Any]], layout_reason: str) -> Any:
    """The model's raw output on an all-zero batch, or a UserError saying why it failed."""
    batch = 2
    fed = (batch, *adapters.native_shape(input_shape, boundary.layout))
    try:
        with torch.no_grad():
            return boundary.model(boundary.adapt_input(torch.zeros((batch, *input_shape), device=device)))
    except Exception as err:
        detail = f"({type(err).__name__}: {_first_line(err)[:160]})"
        if declared:
            hint = f"; its input is declared as {adapters.shape_text(declared)} ({layout_reason})"
        else:
            guess = (_guess_input_shape(boundary.model, input_shape, device)
                     if boundary.layout == "nchw" else None)
            hint = (f"; it seems to need input shape {list(guess)}" if guess
                    else "; check the input shape it expects")
        if boundary.layout == "nhwc" or declared:
            hint += "; --input-layout nchw|nhwc sets the layout"
        raise UserError(f"model forward failed on a zero batch of shape {adapters.shape_text(fed)} "
                        f"({boundary.layout.upper()}){hint} {detail}") from None


def _check_scores(out: Any, batch: int, num_classes: Optional[int], class_map_given: bool) -> int:
    """C for a chosen output, or a UserError: robaudit needs a float [B, C] tensor."""
    if not isinstance(out, torch.Tensor):
        raise UserError(f"model returns {type(out).__name__}; robaudit needs a logits tensor [B, C]")
    if out.ndim != 2 or out.shape[0] != batch:
        raise UserError(f"model output has shape {list(out.shape)} for a batch of {batch}; "
                        f"expected logits [B, C]")
    if not out.is_floating_point():
        raise UserError(f"model output has dtype {str(out.dtype).replace('torch.', '')} (class labels?); "
                        f"robaudit needs float class scores [B, C] (logits or probabilities): "
                        f"pass --output-name to pick another output, or export the logits")
    classes = int(out.shape[1])
    if num_classes is not None and classes != num_classes:
        raise UserError(f"model outputs {classes} classes but dataset has {num_classes}"
                        + ("; --class-map must map every model output to a dataset class"
                           if class_map_given else ""))
    if not torch.isfinite(out).all():
        raise UserError("model produced NaN/inf logits on an all-zero input batch")
    return classes


def _check_device(device: str) -> str:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"invalid device {device!r}: {_first_line(err)}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available")
    return str(parsed)


# --- load_model ------------------------------------------------------------------------

PROBE_TEXT = "a probe batch of 4 uniform-random images"


def load_model(path, *, format="auto", arch=None, num_classes=None, trust_pickle=False,
               mean=None, std=None, device="cpu", input_shape=(3, 32, 32), input_layout="auto",
               input_range="0-1", output="auto", output_name=None, class_map=None,
               class_names=None, dataset_classes=None) -> LoadedModel:
    """Load the model at `path` and adapt it to NCHW [0, 1] in, logits in dataset class order out.

    input_shape is the dataset's (C, H, W). input_layout auto|nchw|nhwc, input_range 0-1|0-255,
    output auto|logits|probs|log-probs and output_name adapt the boundary (audit/adapters.py).
    class_map (a JSON file path, a list or a dict: model index -> dataset class index or name)
    reorders the outputs; class_names (a file path or a list) renames the dataset's classes
    (returned as LoadedModel.class_names). dataset_classes are the dataset's class names
    (they also set num_classes when that is not given). Every adaptation is recorded in
    LoadedModel.adaptations (docs/results-schema.md, model.adaptations).
    """
    path = os.fspath(path)
    input_shape = tuple(int(d) for d in input_shape)
    if not os.path.exists(path):
        raise UserError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory; pass the model file")
    if not os.access(path, os.R_OK):
        raise UserError(f"model file {path} is not readable (permissions)")
    if os.path.getsize(path) == 0:
        raise UserError(f"model file {path} is empty")
    if format != "auto" and format not in FORMATS:
        raise UserError(f"unknown model format {format!r}; choose auto or one of: {', '.join(FORMATS)}")
    if arch is not None:
        arch = check_architecture(arch)
    device = _check_device(device)
    if mean is not None or std is not None:
        mean, std = _check_mean_std(mean, std, input_shape[0])
    scale = adapters.range_scale(input_range)
    adapters.decide_layout(input_layout, None, input_shape)  # validates the choice early
    adapters.check_output_kind(output)
    if dataset_classes is not None:
        dataset_classes = [str(c) for c in dataset_classes]
        if num_classes is None:
            num_classes = len(dataset_classes)
        elif num_classes != len(dataset_classes):
            raise UserError(f"num_classes {num_classes} does not match the dataset's {len(dataset_classes)} classes")
    # Files the user names are read before the model, so a typo fails fast.
    names = names_source = None
    if class_names is not None:
        if dataset_classes is None:
            raise UserError("--class-names needs the dataset's classes to check the count against")
        if isinstance(class_names, (str, os.PathLike)):
            names_source = os.fspath(class_names)
            names = adapters.read_class_names(names_source, dataset_classes)
        else:
            names = [str(n) for n in class_names]
            if len(names) != len(dataset_classes):
                raise UserError(f"{len(names)} class names given but the dataset has "
                                f"{len(dataset_classes)} classes")
    mapping = map_source = None
    if class_map is not None:
        if num_classes is None:
            raise UserError("--class-map needs the dataset's classes to map the model's outputs to")
        target_names = names or dataset_classes or [str(k) for k in range(num_classes)]
        map_source = os.fspath(class_map) if isinstance(class_map, (str, os.PathLike)) else None
        mapping = adapters.resolve_class_map(class_map, target_names, alt_names=dataset_classes or ())

    notes: List[str] = []
    adaptations: Dict[str, Any] = {"normalize": None, "onnx": None, "notes": notes}
    white_box, refusal, declared = True, None, None
    num_params: Optional[int] = None
    onnx_result = None

    kind = _detect_kind(path) if format == "auto" else format
    loaded: Any = None
    if kind in ("torch_pickle", "state_dict", "checkpoint", "pickle"):
        # A forced torch.save format is still classified by content: the file says
        # whether it holds weights, a wrapped checkpoint or a whole module.
        if _is_plain_pickle(path):
            kind, loaded = _load_plain_pickle(path, trust_pickle, notes)
        else:
            kind, loaded = _unwrap_checkpoint(_torch_load(path, trust_pickle), path, notes)
    elif kind == "safetensors":
        loaded = _load_safetensors(path)

    if kind in WEIGHT_FORMATS:
        if arch is None:
            raise UserError(f"{path} holds only weights ({kind}); pass --arch NAME "
                            f"(one of: {', '.join(ARCHITECTURES.names())}, or a torchvision model name)")
        state = _strip_wrapper_prefixes(loaded, notes)
        module = _module_from_weights(state, arch, num_classes, path)
    elif kind == "pickle":
        module = loaded
        if not isinstance(module, nn.Module):
            raise UserError(f"{path} holds a pickled {type(module).__name__}, not an nn.Module")
    elif kind == "torchscript":
        module = _load_torchscript(path, device, notes)
    elif kind == "export":
        module, declared = _load_export(path, device, notes)
    elif kind == "onnx":
        from robaudit.audit.onnx_support import load_onnx

        onnx_result = load_onnx(path, device=device, input_shape=input_shape, input_layout=input_layout,
                                input_scale=scale, output_name=output_name, num_classes=num_classes)
        module, white_box, refusal = onnx_result.module, onnx_result.white_box, onnx_result.refusal
        adaptations["onnx"] = onnx_result.adaptation
        declared = onnx_result.declared_input_shape
        num_params = onnx_result.num_params
        notes.extend(onnx_result.notes)
    else:
        raise AssertionError(kind)

    if kind not in WEIGHT_FORMATS and arch is not None:
        notes.append(f"--arch {arch} ignored: {path} contains the whole model, not just weights")
        arch = None
    if num_params is None:
        num_params = sum(p.numel() for p in module.parameters())
    module = module.to(device) if kind not in ("export", "onnx") else module
    module.eval()

    # --- the boundary: input side --------------------------------------------------------
    if onnx_result is not None:
        layout, layout_reason = onnx_result.layout, onnx_result.layout_reason
    else:
        layout, layout_reason = adapters.decide_layout(input_layout, declared, input_shape)
    boundary = BoundaryModel(module, scale=scale, mean=mean, std=std, layout=layout)
    try:
        out = _zero_forward(boundary, input_shape, device, declared, layout_reason)
    except UserError as nchw_error:
        # A torch module that declares nothing and fails on NCHW: try channels last.
        if not (input_layout == "auto" and declared is None and onnx_result is None
                and adapters.native_shape(input_shape, "nhwc") != input_shape):
            raise
        boundary.layout = "nhwc"
        try:
            out = _zero_forward(boundary, input_shape, device, declared, layout_reason)
        except UserError:
            raise nchw_error from None
        layout, layout_reason = "nhwc", ("the model declares no input shape, fails on NCHW input "
                                         "and runs on NHWC input")

    # --- the boundary: output side -------------------------------------------------------
    if onnx_result is not None:
        out_name, out_names, out_reason = (onnx_result.output_name, onnx_result.output_names,
                                           onnx_result.output_reason)
    else:
        key, out_names, out_reason = adapters.choose_output(out, output_name, 2, num_classes)
        out_name = None if key is None else str(key)
        if key is not None:
            boundary.model = SelectOutput(boundary.model, key)
            out = out[key]
    classes = _check_scores(out, 2, num_classes, mapping is not None)
    probe = torch.rand((4, *input_shape), generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.no_grad():
            scores = boundary(probe)
    except Exception as err:
        raise UserError(f"model forward failed on {PROBE_TEXT}: {type(err).__name__}: "
                        f"{_first_line(err)[:160]}") from None
    output_kind, kind_reason, kind_notes = adapters.decide_output_kind(output, scores, PROBE_TEXT)
    notes.extend(kind_notes)
    boundary.output_kind = output_kind
    if mapping is not None:
        if len(mapping) != classes:
            raise UserError(f"--class-map maps {len(mapping)} model outputs but the model has {classes}")
        boundary.set_column_order(adapters.column_order(mapping))

    # --- what was done, for results.json -------------------------------------------------
    fixed_batch, chunked = _fixed_batch(kind, declared, onnx_result)
    adaptations.update(_describe(
        scale=scale, input_range=input_range, mean=mean, std=std, layout=layout,
        requested_layout=input_layout, declared=declared, layout_reason=layout_reason,
        output_kind=output_kind, requested_output=output, out_name=out_name, out_names=out_names,
        out_reason=out_reason, kind_reason=kind_reason, fixed_batch=fixed_batch, chunked=chunked,
        white_box=white_box, mapping=mapping, map_source=map_source, names=names,
        names_source=names_source, dataset_classes=dataset_classes))
    if mean is not None:
        adaptations["normalize"] = {"mean": mean, "std": std}
        if scale != 1.0 and max(mean) <= 1.0 and max(std) <= 1.0:
            notes.append(f"--mean/--std are applied after scaling inputs to {input_range} (the model's "
                         f"units); values <= 1 look like [0, 1]-unit statistics")

    final = boundary.model if boundary.is_identity() else boundary
    final.eval()
    return LoadedModel(module=final, format=kind, path=path, sha256=sha256_file(path),
                       num_params=int(num_params), arch=arch,
                       white_box=white_box, adaptations=adaptations, refusal=refusal,
                       num_classes=classes, class_names=names)


def _fixed_batch(kind: str, declared: Optional[List[Any]], onnx_result) -> Tuple[Optional[int], bool]:
    if onnx_result is not None:
        return onnx_result.fixed_batch, onnx_result.batch_chunked
    if kind == "export" and declared and isinstance(declared[0], int):
        return declared[0], True
    return None, False


def _describe(*, scale, input_range, mean, std, layout, requested_layout, declared, layout_reason,
              output_kind, requested_output, out_name, out_names, out_reason, kind_reason, fixed_batch,
              chunked, white_box, mapping, map_source, names, names_source, dataset_classes) -> Dict[str, Any]:
    """The model.adaptations entries this module adds (docs/results-schema.md)."""
    pipeline = ["x: NCHW, values in [0, 1] (robaudit's attack space; eps in [0, 1] units)"]
    if scale != 1.0:
        pipeline.append(f"x * {scale:g} (--input-range {input_range}; eps in the model's units = eps * {scale:g})")
    if mean is not None:
        pipeline.append("(x - mean) / std per channel (--mean/--std, in the model's units)")
    if layout == "nhwc":
        pipeline.append("NCHW -> NHWC")
    pipeline.append("the model" + (f", fed in chunks of its fixed batch size {fixed_batch}"
                                   if fixed_batch and chunked else ""))
    if out_names and len(out_names) > 1:
        pipeline.append(f"output {out_name!r} of {len(out_names)}")
    if output_kind == "probs":
        pipeline.append(f"log(max(p, {adapters.PROB_FLOOR:.3g})): probabilities attacked as log-probabilities")
    if mapping is not None:
        pipeline.append("columns reordered by --class-map (column k = dataset class k)")

    batch = None
    if fixed_batch:
        if chunked:
            note = (f"batch fixed at {fixed_batch}: a batch of B images takes ceil(B / {fixed_batch}) "
                    f"forward calls (the last chunk zero-padded), so attacks run slower than on a "
                    f"model with a dynamic batch")
        else:
            note = (f"the model declares batch size {fixed_batch}, but its torch conversion gives the "
                    f"same logits on other batch sizes (checked against onnxruntime), so it is fed "
                    f"whole batches at no throughput cost")
        batch = {"fixed": fixed_batch, "chunked": chunked,
                 "white_box": bool(white_box), "note": note}
    attacked_as = {"logits": "as given", "log-probs": "as given (log-probabilities are logits up to a "
                   "per-row constant)", "probs": f"log(max(p, {adapters.PROB_FLOOR:.3g}))"}[output_kind]
    return {
        "input_layout": {"layout": layout, "requested": requested_layout,
                         "declared_input_shape": (None if declared is None else
                                                  [d if isinstance(d, int) else str(d or "?") for d in declared]),
                         "reason": layout_reason},
        "input_range": {"range": input_range, "scale": scale},
        "output": {"kind": output_kind, "requested": requested_output, "attacked_as": attacked_as,
                   "name": out_name, "available": out_names if out_names and len(out_names) > 1 else None,
                   "reason": kind_reason if out_name is None else f"{out_reason}; {kind_reason}"},
        "batch_size": batch,
        "class_map": (None if mapping is None else
                      {"file": map_source, "model_to_dataset": list(mapping),
                       "identity": list(mapping) == list(range(len(mapping)))}),
        "class_names": (None if names is None else
                        {"file": names_source, "names": list(names), "dataset_names": dataset_classes}),
        "pipeline": pipeline,
    }


def _is_plain_pickle(path: str) -> bool:
    """A pickle written by pickle.dump rather than torch.save (zip or legacy format)."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5
            and not (head[2:4] == b"\x8a\x0a"
                     and int.from_bytes(head[4:14], "little") == _TORCH_LEGACY_MAGIC))


def _load_plain_pickle(path: str, trust_pickle: bool, notes: List[str]) -> Tuple[str, Any]:
    """There is no weights-only reader for plain pickles, so they only open with trust_pickle."""
    if not trust_pickle:
        raise UserError(_PICKLE_REFUSAL.format(path=path))
    try:
        with open(path, "rb") as handle:
            obj = pickle.load(handle)
    except Exception as err:
        raise UserError(f"could not unpickle {path}: {_first_line(err)}") from None
    return _unwrap_checkpoint(obj, path, notes)
