"""The remediation training loop: distil (or adversarially train) a student, then re-audit it.

A plain loop in the style of the torchvision references: data on the device, one
`method.loss` per batch, SGD + MultiStepLR, one atomic checkpoint per epoch. What
`run_remediate` writes into `out_dir`:

    checkpoint.pt     everything needed to continue exactly (--resume), written atomically
    best.pt           the selected student's weights (validation-selected; see below)
    metrics.csv       one row per epoch: loss, lr, per-class train risks/accuracies, the
                      method's state (temperatures, class weights, ...), val clean/robust
    student.pt2       the selected student as torch.export (also .torchscript.pt, .onnx)
    student/          results.json / samples.npz / report.html of the same audit as `scan`

Schedule. The paper schedule is 300 epochs with lr /10 after epochs 215, 260 and 285.
A run with E != 300 epochs and no explicit milestones keeps the same fractions:
round(m * E / 300) for each m, clipped to [1, E] and de-duplicated; ABSLD's beta decays
at the same epochs. Epochs are numbered from 1; a milestone m takes effect from epoch
m + 1 (the authors' `if epoch in [215, 260, 285]` after the epoch).

Checkpoint selection. `val_per_class` images per class are held out of the training
split (drawn with the seed, never the test set). After every epoch the method's eval
model is attacked with PGD-`val_steps` (uniform start, fixed per-sample starts so
epochs are compared on equal terms, final iterate, clean-correct required) and the
epoch with the highest avg + worst class robust accuracy (worst-10% mean for >= 50
classes) is kept in best.pt. The ABSLD authors selected on the full test set; reports
should say that the paper's numbers were selected differently.

Determinism. The per-epoch shuffle comes from a generator seeded by (seed, epoch);
augmentation and attack starts from robaudit.audit.rng keyed by dataset index. With
the checkpoint holding model, optimizer, scheduler, method state and the torch RNG
state, N epochs straight equal K epochs + resume + N - K epochs bitwise on CPU.

Scaling out (`torchrun --nproc-per-node W -m robaudit remediate ...`; every rank calls
run_remediate with the same arguments once torch.distributed is initialised):
- --batch-size is the global batch. Every rank draws the same epoch permutation and
  takes every W-th image of each global batch (DistributedSampler semantics without
  padding), so an epoch visits exactly the images one process would, in the same
  global batches, and the lr / schedule mean the same for any W. A rank's batch mean
  is weighted by its share when W does not divide the batch, so the DDP-averaged
  gradient is the gradient of the global batch mean. A last batch smaller than W is
  skipped (logged). Augmentation and attack starts are keyed by dataset index, so they
  do not depend on the rank.
- The student is DistributedDataParallel; the inner attack runs on the unwrapped module.
  BatchNorm: without --sync-bn each rank normalises its own share in train mode and
  the running statistics are rank 0's, broadcast at each step and epoch end (DDP's
  convention, made explicit so that attacks and validation see one model); --sync-bn
  (GPUs) normalises over the global batch, as one process does.
- The teacher is replicated on every rank in inference mode.
- The per-class tallies that drive the methods (ABSLD risks, Fair-ARD kappas, CFA
  accuracies) are summed over ranks (float64, in rank order) before `end_epoch`, so
  every rank holds the same temperatures / weights, equal to one process given the
  same per-sample values. Validation is sharded (every W-th held-out image) and its
  per-class counts are summed the same way, so checkpoint selection and CFA's FAWA
  decide identically on every rank.
- Rank 0 alone touches --out: it reads the checkpoint on resume (and broadcasts it),
  writes checkpoint.pt / best.pt / metrics.csv atomically and exports the student.
  The checkpoint holds the unwrapped module, so it resumes under any world size.
- A failure on one rank (an exception in a step, a write on rank 0) is agreed on at the
  next step or write: every rank raises one UserError naming it, and nothing more is
  written. A rank that dies outright is torchrun's to stop.
- The student audit: every rank calls engine.run_scan, which shards it; rank 0 writes.
"""

from __future__ import annotations

import copy
import csv
import errno
import hashlib
import inspect
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from robaudit.audit import distributed
from robaudit.audit.attacks.ascent import projected_ascent
from robaudit.audit.rng import per_sample_uniform
from robaudit.audit.io import check_writable_dir, write_bytes_atomic
from robaudit.errors import UserError
from robaudit.remediate.methods import DEFAULT_METHOD, METHODS, TALLY_DTYPE, class_sums, create_method, eval_mode

log = logging.getLogger(__name__)

PAPER_EPOCHS = 300
PAPER_MILESTONES = (215, 260, 285)
CHECKPOINT_KIND = "robaudit-remediate-checkpoint"
CHECKPOINT_VERSION = 1
EXPORT_FORMATS = ("pt2", "torchscript", "onnx")

# rng streams of the loop, far above the methods' (epoch * 16 + purpose) attack streams.
STREAM_AUGMENT = 1 << 30
STREAM_VALIDATION_SPLIT = (1 << 30) - 1
STREAM_VALIDATION_START = (1 << 30) - 2
AUGMENT_PAD = 4


@dataclass
class RemediateConfig:
    """Everything a remediation run depends on; the defaults are the ABSLD paper's."""

    out_dir: Path
    method: str = DEFAULT_METHOD
    method_options: Dict[str, object] = field(default_factory=dict)
    student: Optional[str] = "resnet18"            # architecture name (audit.architectures)
    student_init: Optional[str] = None             # or a model file to fine-tune
    dataset: Optional[str] = None                  # for dataset-dependent defaults; default: train_data.name
    epochs: int = PAPER_EPOCHS
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    batch_size: int = 128
    milestones: Optional[Sequence[int]] = None     # None: PAPER_MILESTONES scaled to `epochs`
    steps: int = 10                                # inner maximisation steps
    step_size: float = 2 / 255
    eps: float = 8 / 255
    val_per_class: int = 100                       # held out of the training split; 0: no selection
    val_steps: int = 20                            # PGD steps of the selection attack
    val_batch_size: int = 256
    augment: bool = True                           # random crop (pad 4) + horizontal flip
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"                        # "fp32" | "bf16" (autocast, CUDA only)
    channels_last: Optional[bool] = None           # None: on for CUDA
    resume: bool = False
    export_formats: Sequence[str] = EXPORT_FORMATS
    audit_attacks: Optional[Sequence[str]] = None  # student re-audit; None: engine default
    audit_overrides: Dict[str, dict] = field(default_factory=dict)
    audit_batch_size: int = 256
    command: Optional[str] = None
    progress: bool = True
    sync_bn: bool = False                          # torchrun on GPUs: BatchNorm statistics over the global batch


# ---------------------------------------------------------------------------- schedule / data
def scale_milestones(epochs: int, base: Sequence[int] = PAPER_MILESTONES,
                     base_epochs: int = PAPER_EPOCHS) -> Tuple[int, ...]:
    """The paper's lr milestones at the same fractions of an `epochs`-long run."""
    if epochs == base_epochs:
        return tuple(int(m) for m in base)
    scaled = [min(max(1, round(m * epochs / base_epochs)), epochs) for m in base]
    return tuple(dict.fromkeys(scaled))


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of `epoch`: a function of (seed, epoch) only, so resume is exact."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed((int(seed) * 1_000_003 + int(epoch) * 7919 + 17) % (2 ** 63))
    return torch.randperm(n, generator=generator)


def augment_batch(x: torch.Tensor, index: torch.Tensor, seed: int, epoch: int,
                  pad: int = AUGMENT_PAD) -> torch.Tensor:
    """Random crop after zero padding by `pad` + horizontal flip with probability 1/2.

    Per-sample and seeded by (seed, epoch, dataset index); one gather for the whole batch.
    """
    n, _, h, w = x.shape
    u = per_sample_uniform(seed, index, (3,), stream=STREAM_AUGMENT + int(epoch), device=x.device)
    offset_y = (u[:, 0] * (2 * pad + 1)).long().clamp_max(2 * pad)
    offset_x = (u[:, 1] * (2 * pad + 1)).long().clamp_max(2 * pad)
    flip = u[:, 2] < 0.5
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offset_y[:, None] + torch.arange(h, device=x.device)[None, :]          # [N, H]
    cols = offset_x[:, None] + torch.arange(w, device=x.device)[None, :]          # [N, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [N, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def split_validation(y: torch.Tensor, index: torch.Tensor, per_class: int, seed: int,
                     num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train positions, validation positions): `per_class` seeded picks per class."""
    if per_class <= 0:
        return torch.arange(len(y)), torch.zeros(0, dtype=torch.long)
    counts = torch.bincount(y, minlength=num_classes)
    short = (counts <= per_class).nonzero().flatten()
    if len(short):
        k = int(short[0])
        raise UserError(
            f"class {k} has only {int(counts[k])} training images: --val-per-class {per_class} would "
            f"leave none to train on; pass a smaller --val-per-class (or 0 to select the last epoch)"
        )
    key = per_sample_uniform(seed, index, (1,), stream=STREAM_VALIDATION_SPLIT).flatten()
    by_key = torch.argsort(key, stable=True)
    order = by_key[torch.argsort(y[by_key], stable=True)]          # grouped by class, random within
    sorted_y = y[order]
    block_start = torch.searchsorted(sorted_y, sorted_y, right=False)
    rank = torch.arange(len(y)) - block_start
    is_val = torch.zeros(len(y), dtype=torch.bool)
    is_val[order[rank < per_class]] = True
    return (~is_val).nonzero().flatten(), is_val.nonzero().flatten()


# ---------------------------------------------------------------------------- evaluation
def evaluate_per_class(model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                       num_classes: int, *, eps: float, step_size: float, steps: int, seed: int,
                       batch_size: int = 256, autocast: Callable = nullcontext,
                       memory_format=torch.contiguous_format,
                       reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-class (clean accuracy, PGD robust accuracy) of `model` in eval mode.

    Robust = clean-correct and the final PGD iterate still correct (CE, uniform start
    fixed per sample, so every epoch faces the same starts). Absent classes give NaN.
    `reduce` maps the per-class counts [C, 3] (images, clean-correct, robust-correct)
    before the division: under torchrun a sum over ranks, each rank holding a shard.
    """
    device = x.device
    tally = torch.zeros(num_classes, 3, device=device, dtype=TALLY_DTYPE)
    with eval_mode(model):
        for start in range(0, len(y), batch_size):
            xb = x[start:start + batch_size].contiguous(memory_format=memory_format)
            yb, ib = y[start:start + batch_size], index[start:start + batch_size]
            with torch.no_grad(), autocast():
                clean_ok = model(xb).argmax(1) == yb
            u = per_sample_uniform(seed, ib, xb.shape[1:], stream=STREAM_VALIDATION_START,
                                   device=device, dtype=xb.dtype)
            with autocast():
                x_adv = projected_ascent(
                    lambda xa: F.cross_entropy(model(xa).float(), yb, reduction="none"), xb,
                    eps=eps, step_size=step_size, steps=steps, x_start=xb + (2 * u - 1) * eps)
            with torch.no_grad(), autocast():
                robust = clean_ok & (model(x_adv).argmax(1) == yb)
            columns = torch.stack([torch.ones_like(clean_ok, dtype=torch.float32), clean_ok.float(),
                                   robust.float()], dim=1)
            tally += class_sums(yb, columns, num_classes, dtype=tally.dtype)
    if reduce is not None:
        tally = reduce(tally)
    counts = tally[:, 0]
    nan = torch.full_like(counts, float("nan"))
    clean = torch.where(counts > 0, tally[:, 1] / counts.clamp_min(1), nan)
    robust = torch.where(counts > 0, tally[:, 2] / counts.clamp_min(1), nan)
    return clean.float().cpu(), robust.float().cpu()


def worst_metric(per_class: torch.Tensor) -> float:
    """Worst class accuracy, or for >= 50 classes the mean of the lowest ceil(C/10)."""
    values = per_class[~torch.isnan(per_class)]
    if values.numel() == 0:
        return float("nan")
    if per_class.numel() >= 50:
        k = math.ceil(per_class.numel() / 10)
        return float(values.sort().values[:k].mean())
    return float(values.min())


def selection_score(robust_per_class: torch.Tensor) -> float:
    """Checkpoint selection: avg + worst (worst-10% for >= 50 classes) robust accuracy."""
    values = robust_per_class[~torch.isnan(robust_per_class)]
    return float(values.mean()) + worst_metric(robust_per_class)


# ---------------------------------------------------------------------------- files
def _describe_os_error(err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        return "no space left on the device"
    return err.strerror or str(err)


def save_atomic(obj, path: Path) -> None:
    """torch.save `obj` to `path` via a temporary file + rename: readers never see half a file."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        write_bytes_atomic(path, buffer.getvalue())
    except OSError as err:
        raise UserError(f"could not write {path}: {_describe_os_error(err)}; "
                        f"the previous {path.name} (if any) is unchanged") from err


def _write_text_atomic(path: Path, text: str) -> None:
    try:
        write_bytes_atomic(path, text.encode("utf-8"))
    except OSError as err:
        raise UserError(f"could not write {path}: {_describe_os_error(err)}") from err


def _csv_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return repr(round(value, 6))
    return str(value)


def metrics_rows(history: List[dict], classes: Sequence[str]) -> Tuple[List[str], List[dict]]:
    """Flatten the per-epoch history: scalars as columns, per-class lists as 'key:class'."""
    header: List[str] = []
    rows: List[dict] = []
    for entry in history:
        flat: Dict[str, object] = {}
        for key, value in entry.items():
            if key == "method":
                continue
            if isinstance(value, list):
                for cls, v in zip(classes, value):
                    flat[f"{key}:{cls}"] = v
            else:
                flat[key] = value
        for key, value in entry.get("method", {}).items():
            if isinstance(value, list):
                for cls, v in zip(classes, value):
                    flat[f"{key}:{cls}"] = v
            else:
                flat[key] = value
        for key in flat:
            if key not in header:
                header.append(key)
        rows.append(flat)
    return header, rows


def write_metrics_csv(path: Path, history: List[dict], classes: Sequence[str]) -> None:
    header, rows = metrics_rows(history, classes)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_csv_value(row.get(key)) for key in header])
    _write_text_atomic(path, buffer.getvalue())


def _nan_to_none(values: List[float]) -> List[Optional[float]]:
    return [None if (v is None or (isinstance(v, float) and math.isnan(v))) else float(v) for v in values]


# ---------------------------------------------------------------------------- models
def _build_student(cfg: RemediateConfig, num_classes: int, device: torch.device) -> Tuple[nn.Module, str]:
    """(student module, description). Weights from the seed, or from --student-init."""
    if cfg.student_init:
        from robaudit.audit.loading import load_model

        loaded = load_model(cfg.student_init, arch=cfg.student, num_classes=num_classes, device=str(device))
        if not loaded.white_box:
            raise UserError(f"cannot fine-tune {cfg.student_init}: {loaded.refusal or 'it has no gradients'}")
        if loaded.format == "export":
            raise UserError(f"cannot fine-tune {cfg.student_init}: a torch.export (.pt2) program has its "
                            f"train/eval behaviour fixed; pass its weights (state_dict/checkpoint) with --student")
        module = loaded.module
        if not any(p.requires_grad for p in module.parameters()):
            raise UserError(f"cannot fine-tune {cfg.student_init}: the loaded model has no trainable parameters")
        return module, str(cfg.student_init)
    if not cfg.student:
        raise UserError("no student given: pass --student NAME or --student-init PATH")
    from robaudit.audit.architectures import create_architecture

    torch.manual_seed(cfg.seed)   # the initial weights are a function of the seed
    return create_architecture(cfg.student, num_classes), cfg.student


def _output_classes(module: nn.Module, example: torch.Tensor) -> int:
    with torch.inference_mode(), eval_mode(module):
        out = module(example)
    if out.dim() != 2:
        raise UserError(f"the model returns an output of shape {tuple(out.shape)}, not [batch, classes] logits")
    return int(out.shape[1])


def _fingerprint(cfg: RemediateConfig, method_options: dict, milestones, num_classes: int,
                 train_index: torch.Tensor, student_desc: str) -> dict:
    """What a resumed run must share with the checkpoint (everything but the epoch count)."""
    return {
        "method": cfg.method.lower(), "method_options": json.loads(json.dumps(method_options, default=str)),
        "student": student_desc, "num_classes": num_classes, "lr": cfg.lr, "momentum": cfg.momentum,
        "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size, "milestones": list(milestones),
        "val_per_class": cfg.val_per_class, "val_steps": cfg.val_steps, "augment": cfg.augment,
        "seed": cfg.seed, "precision": cfg.precision,
        "train_index_sha256": hashlib.sha256(train_index.numpy().tobytes()).hexdigest(),
    }


def _export(module: nn.Module, example: torch.Tensor, out_dir: Path, formats: Sequence[str]) -> Dict[str, dict]:
    """Export the selected student (CPU, fp32, eval); a failed format is reported, not fatal."""
    module = copy.deepcopy(module).to("cpu", memory_format=torch.contiguous_format).float().eval()
    example = example.to("cpu").float().contiguous()
    results: Dict[str, dict] = {}
    for fmt in formats:
        fmt = fmt.lower()
        try:
            if fmt == "pt2":
                from robaudit.audit.loading import save_export

                path = out_dir / "student.pt2"
                save_export(module, path, example)
            elif fmt == "torchscript":
                path = out_dir / "student.torchscript.pt"
                buffer = io.BytesIO()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")   # torch.jit is deprecated but still the format users load
                    torch.jit.save(torch.jit.trace(module, example), buffer)
                write_bytes_atomic(path, buffer.getvalue())
            elif fmt == "onnx":
                path = out_dir / "student.onnx"
                _export_onnx(module, example, path)
            else:
                raise UserError(f"unknown export format {fmt!r}; choose from {', '.join(EXPORT_FORMATS)}")
            results[fmt] = {"path": str(path), "ok": True, "error": None}
        except UserError:
            raise
        except Exception as err:   # an exporter's limitation must not cost the trained student
            log.warning("could not export the student as %s: %s", fmt, err)
            results[fmt] = {"path": None, "ok": False, "error": f"{type(err).__name__}: {err}".splitlines()[0]}
    return results



def _export_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    tmp_dir = Path(tempfile.mkdtemp(prefix=".onnx-export.", dir=path.parent))
    tmp_path = tmp_dir / path.name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:   # the torch.export-based exporter, batch dimension dynamic, weights in the one file
                torch.onnx.export(module, (example,), str(tmp_path), dynamo=True, verbose=False,
                                  external_data=False, input_names=["input"], output_names=["logits"],
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
            except Exception:   # models torch.export cannot trace: the legacy TorchScript exporter
                torch.onnx.export(module, (example,), str(tmp_path), dynamo=False,
                                  input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        os.replace(tmp_path, path)
    finally:
        for leftover in tmp_dir.glob("*"):
            leftover.unlink()
        tmp_dir.rmdir()


# ---------------------------------------------------------------------------- shared by the loops
@dataclass
class Runtime:
    """Where and how a training loop computes (resolved from a RemediateConfig)."""

    device: torch.device
    use_bf16: bool
    channels_last: bool
    memory_format: torch.memory_format

    def autocast(self):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16) if self.use_bf16 else nullcontext()


def resolve_runtime(cfg: RemediateConfig, ctx: Optional[distributed.DistContext] = None) -> Runtime:
    """The device (torchrun: one GPU per local rank), bf16 autocast (CUDA only) and memory format."""
    ctx = ctx if ctx is not None else distributed.current()
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if device.type == "cuda" and device.index is None and ctx.enabled:
        device = torch.device("cuda", ctx.local_rank)   # torchrun: one GPU per local rank
    if cfg.sync_bn and ctx.enabled and device.type != "cuda":
        raise UserError("--sync-bn needs GPUs: torch's SyncBatchNorm does not run on CPU; leave it off "
                        "(each process then normalises its own share of the batch)")
    use_bf16 = cfg.precision == "bf16"
    if use_bf16 and device.type != "cuda":
        if ctx.is_main:
            log.warning("--precision bf16 applies on CUDA only; training in fp32 on %s", device)
        use_bf16 = False
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return Runtime(device=device, use_bf16=use_bf16, channels_last=channels_last, memory_format=memory_format)


def prepare_out_dir_for_resume(out_dir: Path, checkpoint_path: Path, resume: bool,
                               fingerprint: dict, *, create: bool = True) -> Optional[dict]:
    """Rank 0 only: create --out, refuse to overwrite a checkpoint, read one to resume (or None).

    create=False (the pre-flight check): only check that --out could be created and read what
    is there; nothing is written.
    """
    try:
        if create:
            out_dir.mkdir(parents=True, exist_ok=True)
        else:
            check_writable_dir(out_dir)
    except OSError as err:
        raise UserError(f"cannot create --out {out_dir}: {_describe_os_error(err)}")
    if checkpoint_path.exists() and not resume:
        raise UserError(f"{out_dir} already holds a remediation checkpoint: pass --resume to continue it, "
                        f"or choose another --out")
    if resume and checkpoint_path.exists():
        saved = _load_checkpoint(checkpoint_path)
        _check_resume(saved, fingerprint)
        return saved
    if resume:
        log.warning("--resume: no checkpoint in %s, starting from epoch 1", out_dir)
    return None


# ---------------------------------------------------------------------------- the run
def run_remediate(cfg: RemediateConfig, *, teacher, train_data, test_data=None,
                  student_module: Optional[nn.Module] = None, dry_run: bool = False) -> Optional[dict]:
    """Train a student from `teacher` (a LoadedModel) on `train_data` (an EvalData), export it,
    and, given `test_data`, audit it with `engine.run_scan` into out_dir/student/.

    `student_module` replaces cfg.student / cfg.student_init with a ready module (for
    programmatic use and tests). `teacher` may be None for methods without one (sat,
    trades, cfa). Returns {"out_dir", "method", "epochs" (trained so far), "selected_epoch",
    "best_score", "checkpoint", "best", "metrics" (paths), "exports" ({format: {"path",
    "ok", "error"}}), "training" (the results.json block), "student_results" (run_scan's
    results, or None without test_data)}.

    Under torchrun (torch.distributed initialised, e.g. by distributed.init_from_env) every
    rank calls this with the same arguments; see "Scaling out" in the module docstring.

    dry_run=True makes every check on the options, the data, the models and an existing
    checkpoint in --out, writes nothing and returns None: `robaudit remediate` calls it
    before the teacher audit writes its first file.
    """
    out_dir = Path(cfg.out_dir)
    method_cls = METHODS.get(cfg.method)
    ctx = distributed.current()
    world, rank = ctx.world_size, ctx.rank
    check_config(cfg, world)
    runtime = resolve_runtime(cfg, ctx)
    device, memory_format, channels_last = runtime.device, runtime.memory_format, runtime.channels_last
    autocast = runtime.autocast
    show_progress = cfg.progress and ctx.is_main

    classes = list(train_data.classes)
    num_classes = len(classes)
    if len(train_data.y) == 0:
        raise UserError("the training selection is empty; check --limit / --n-per-class")
    example = train_data.x[:1].to(device)

    teacher_module = None
    if method_cls.needs_teacher:
        if teacher is None:
            raise UserError(f"method {method_cls.name!r} distils a teacher: pass --teacher PATH")
        # load_model already put it on the device in eval mode; exported (.pt2) and ONNX
        # modules cannot be moved with .to(), so it is used as given. Under torchrun every
        # rank holds its own replica (inference only: no gradients, nothing to synchronise).
        teacher_module = teacher.module
        teacher_module.eval()
        teacher_classes = _output_classes(teacher_module, example)
        if teacher_classes != num_classes:
            raise UserError(f"the teacher predicts {teacher_classes} classes but the dataset has {num_classes}; "
                            f"pass the teacher trained on this dataset")
    if student_module is not None:
        student, student_desc = student_module, type(student_module).__name__
    else:
        student, student_desc = _build_student(cfg, num_classes, device)
    student = student.to(device)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
    student_classes = _output_classes(student, example)
    if student_classes != num_classes:
        raise UserError(f"the student predicts {student_classes} classes but the dataset has {num_classes}")
    if test_data is not None and len(test_data.classes) != num_classes:
        raise UserError(f"the test split has {len(test_data.classes)} classes but the training split {num_classes}")
    if cfg.sync_bn and ctx.enabled:
        # Shares the BatchNorm parameters and buffers; state_dict keys are unchanged, so
        # checkpoints resume with or without --sync-bn, and eval mode is plain BatchNorm.
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)

    milestones = tuple(cfg.milestones) if cfg.milestones is not None else scale_milestones(cfg.epochs)
    method = create_method(cfg.method, num_classes, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps,
                           seed=cfg.seed, dataset=cfg.dataset or getattr(train_data, "name", None),
                           student_arch=cfg.student if student_module is None else None,
                           **cfg.method_options)
    method.configure(epochs=cfg.epochs, lr_milestones=milestones)
    if getattr(method, "needs_validation", False) and cfg.val_per_class <= 0:
        raise UserError(f"method {method.name!r} averages weights on a validation split: "
                        f"pass --val-per-class > 0 (CFA uses 100) or turn its weight averaging off")

    train_pos, val_pos = split_validation(train_data.y, train_data.index, cfg.val_per_class, cfg.seed, num_classes)
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=0.1)
    fingerprint = _fingerprint(cfg, method.options(), milestones, num_classes, train_data.index[train_pos],
                               student_desc)

    checkpoint_path, best_path, metrics_path = out_dir / "checkpoint.pt", out_dir / "best.pt", out_dir / "metrics.csv"

    def prepare_out_dir() -> Optional[dict]:
        return prepare_out_dir_for_resume(out_dir, checkpoint_path, cfg.resume, fingerprint, create=not dry_run)

    if dry_run:
        _on_main(prepare_out_dir)
        return None

    # The data goes to the device only for a real run (a dry run checks and returns above).
    x_train = train_data.x[train_pos].to(device)
    y_train = train_data.y[train_pos].to(device)
    i_train = train_data.index[train_pos].to(device)
    n_val = len(val_pos)
    # Each rank validates every world-th held-out image; the per-class counts are summed.
    val_mine = val_pos[rank::world]
    x_val = train_data.x[val_mine].to(device).contiguous(memory_format=memory_format)
    y_val = train_data.y[val_mine].to(device)
    i_val = train_data.index[val_mine].to(device)
    n_train = len(y_train)

    def val_eval(model: nn.Module, steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return evaluate_per_class(model, x_val, y_val, i_val, num_classes, eps=cfg.eps, step_size=cfg.step_size,
                                  steps=steps, seed=cfg.seed, batch_size=cfg.val_batch_size,
                                  autocast=autocast, memory_format=memory_format,
                                  reduce=distributed.sum_over_ranks if ctx.enabled else None)

    history: List[dict] = []
    best = {"epoch": None, "score": None}
    start_epoch = 1
    state = _on_main(prepare_out_dir, share=True)
    if state is not None:
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method"])
        method.to(device)
        torch.set_rng_state(state["rng"]["torch"])
        _set_cuda_rng(state["rng"].get("cuda"), device)
        history, best = state["history"], state["best"]
        start_epoch = int(state["epoch"]) + 1
        # checkpoint.pt is renamed into place before metrics.csv: a kill in between leaves
        # metrics.csv an epoch short, which no later epoch rewrites if it was the last one.
        _on_main(lambda: write_metrics_csv(metrics_path, history, classes))
        if ctx.is_main:
            log.info("resuming %s from epoch %d (%d process%s)", out_dir, start_epoch, world,
                     "" if world == 1 else "es")
        del state

    raw = student   # the plain module: optimised, validated, checkpointed and exported
    buffers = list(raw.buffers())
    if ctx.enabled:
        # Every rank attacks and validates with rank 0's BatchNorm running statistics,
        # synchronised explicitly (start of each step, end of each epoch) instead of by
        # DDP at every forward; the parameters DDP keeps identical by averaging gradients.
        student = nn.parallel.DistributedDataParallel(
            raw, device_ids=[device.index] if device.type == "cuda" else None, **_ddp_buffer_options())
    tail = n_train % cfg.batch_size
    skip_tail = ctx.enabled and 0 < tail < world
    if skip_tail and ctx.is_main:
        log.warning("the last batch of each epoch (%d images) is smaller than the %d processes and is "
                    "skipped; pick --batch-size so that it is not (or a training size that divides)", tail, world)

    epoch_bar = tqdm(total=cfg.epochs, initial=start_epoch - 1, desc="remediate", unit="epoch",
                     file=sys.stderr, disable=not show_progress or None, dynamic_ncols=True)
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            t_epoch = time.perf_counter()
            student.train()
            lr = optimizer.param_groups[0]["lr"]
            order = epoch_permutation(n_train, cfg.seed, epoch).to(device)
            loss_sum, seen = 0.0, 0
            batch_bar = tqdm(total=n_train, desc=f"epoch {epoch}", unit="img", file=sys.stderr, leave=False,
                             disable=not show_progress or None, dynamic_ncols=True)
            try:
                for step, start in enumerate(range(0, n_train, cfg.batch_size)):
                    global_idx = order[start:start + cfg.batch_size]
                    if len(global_idx) < world:
                        continue   # only with skip_tail: some rank would get no image
                    # DistributedSampler semantics on the global batch: the same permutation on
                    # every rank, rank r takes every world-th image of the batch.
                    idx = global_idx[rank::world]
                    distributed.broadcast_tensors_(buffers)
                    loss, loss_value, error = None, float("nan"), None
                    try:
                        xb, yb, ib = x_train[idx], y_train[idx], i_train[idx]
                        if cfg.augment:
                            xb = augment_batch(xb, ib, cfg.seed, epoch)
                        xb = xb.contiguous(memory_format=memory_format)
                        teacher_logits = None
                        if teacher_module is not None:
                            with torch.inference_mode(), autocast():
                                teacher_logits = teacher_module(xb)
                            # A normal tensor: inference tensors cannot be saved for backward.
                            teacher_logits = teacher_logits.float().clone()
                        optimizer.zero_grad(set_to_none=True)
                        with autocast():
                            loss, _ = method.loss(student, teacher_logits, xb, yb, ib, epoch)
                        loss_value = float(loss.detach())
                    except Exception as err:
                        if not ctx.enabled:
                            raise
                        error = err   # every rank must hear of it before the gradient all-reduce
                    step_sum, step_n = _step_totals(loss_value, len(idx), error, device)
                    batch_loss = step_sum / step_n
                    if not math.isfinite(batch_loss):
                        kept = (f"the last good checkpoint (epoch {history[-1]['epoch']}) is kept in "
                                f"{checkpoint_path}" if history else "no checkpoint had been written yet")
                        raise UserError(f"training stopped: the loss became {batch_loss} at epoch {epoch}, "
                                        f"batch {step + 1}; {kept}; try a lower --lr or --precision fp32")
                    if len(idx) * world != len(global_idx):
                        # Uneven shares: DDP averages the ranks' gradients, so weight each rank's
                        # batch mean by its share to get the gradient of the global batch mean.
                        loss = loss * (len(idx) * world / len(global_idx))
                    loss.backward()
                    optimizer.step()
                    loss_sum += step_sum
                    seen += step_n
                    batch_bar.update(len(global_idx))
                    batch_bar.set_postfix(loss=f"{batch_loss:.4f}")
            finally:
                batch_bar.close()
            scheduler.step()

            if ctx.enabled:
                distributed.broadcast_tensors_(buffers)              # one model on every rank
                method.reduce_tallies(distributed.sum_over_ranks)   # the whole epoch's per-class statistics
            record = method.end_epoch(epoch, student=raw, val_robust=lambda m, s: val_eval(m, s)[1])
            entry = {"epoch": epoch, "lr": lr, "loss": loss_sum / max(seen, 1)}
            improved = False
            if n_val:
                clean, robust = val_eval(method.eval_model(raw), cfg.val_steps)
                score = selection_score(robust)
                entry.update({"val_clean_avg": float(clean.nanmean()), "val_clean_worst": worst_metric(clean),
                              "val_robust_avg": float(robust.nanmean()), "val_robust_worst": worst_metric(robust),
                              "score": score})
                improved = best["score"] is None or score > best["score"]
                if improved:
                    best = {"epoch": epoch, "score": score}
                entry["val_clean"] = _nan_to_none(clean.tolist())
                entry["val_robust"] = _nan_to_none(robust.tolist())
            entry["world_size"] = world
            entry["seconds"] = time.perf_counter() - t_epoch
            entry["method"] = record
            history.append(entry)

            def write_epoch(improved=improved, epoch=epoch) -> None:
                if improved:
                    save_atomic(_best_payload(method.eval_model(raw), cfg, method, classes, epoch, best["score"]),
                                best_path)
                save_atomic({
                    "kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "epoch": epoch,
                    "student": raw.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "method": method.state_dict(),
                    "rng": {"torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                    "best": best, "history": history, "fingerprint": fingerprint, "classes": classes,
                }, checkpoint_path)
                write_metrics_csv(metrics_path, history, classes)

            _on_main(write_epoch)
            epoch_bar.update(1)
            postfix = {"loss": f"{entry['loss']:.4f}"}
            if "val_robust_avg" in entry:
                postfix.update(val_rob=f"{entry['val_robust_avg']:.3f}", worst=f"{entry['val_robust_worst']:.3f}")
            epoch_bar.set_postfix(postfix)
    finally:
        epoch_bar.close()

    def select_and_export() -> Tuple[Optional[int], Dict[str, dict]]:
        selected, selected_epoch = _selected_student(method, raw, best, best_path, history)
        exports = _export(selected, train_data.x[:1], out_dir, cfg.export_formats) if cfg.export_formats else {}
        return selected_epoch, exports

    selected_epoch, exports = _on_main(select_and_export, share=True)
    training = training_block(cfg, method, teacher, history, selected_epoch, n_val > 0)
    summary = {
        "out_dir": str(out_dir), "method": method.name, "epochs": len(history),
        "selected_epoch": selected_epoch, "best_score": best["score"],
        "checkpoint": str(checkpoint_path), "best": str(best_path) if best["epoch"] is not None else None,
        "metrics": str(metrics_path), "exports": exports, "training": training, "student_results": None,
    }
    if test_data is not None:
        summary["student_results"] = _audit_student(cfg, exports, test_data, training, out_dir)
    return summary


def _on_main(fn: Callable[[], object], *, share: bool = False):
    """fn() on rank 0 only (the one that touches --out); a failure there ends every rank with one
    UserError (distributed.agree_or_raise); share=True hands fn's result to every rank.
    In a single process simply fn()."""
    ctx = distributed.current()
    if not ctx.enabled:
        return fn()
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as err:
            error = err
    _agree(error)
    return distributed.broadcast_object(result) if share else result


def _agree(error: Optional[BaseException]) -> None:
    """distributed.agree_or_raise, keeping this rank's own failure as the cause (for --debug tracebacks)."""
    try:
        distributed.agree_or_raise(error)
    except UserError as raised:
        if error is not None and raised is not error:
            raise raised from error
        raise


def _step_totals(loss_value: float, n: int, error: Optional[BaseException], device: torch.device) -> Tuple[float, int]:
    """(sum of the per-image losses, images) of the global batch; a failed rank stops every rank here.

    One small all-reduce per step under torchrun, before the backward pass (whose gradient
    all-reduce would otherwise wait forever for a rank that has stopped).
    """
    if not distributed.current().enabled:
        return loss_value * n, n
    totals = torch.tensor([0.0 if error is not None else loss_value * n, float(n), float(error is not None)],
                          dtype=torch.float64, device=device)
    distributed.all_reduce_sum(totals)
    step_sum, step_n, failed = totals.tolist()
    if failed:
        _agree(error)
    return step_sum, int(step_n)


def _ddp_buffer_options() -> dict:
    """Turn off DDP's buffer broadcast at every forward (the loop synchronises buffers itself)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in params:      # torch >= 2.13
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _set_cuda_rng(cuda_state, device: torch.device) -> None:
    if device.type != "cuda" or cuda_state is None:
        return
    if isinstance(cuda_state, (list, tuple)):   # older checkpoints: every visible device's state
        index = device.index if device.index is not None else torch.cuda.current_device()
        cuda_state = cuda_state[index] if index < len(cuda_state) else cuda_state[0]
    torch.cuda.set_rng_state(cuda_state, device)


def check_config(cfg: RemediateConfig, world_size: int = 1) -> None:
    if cfg.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {cfg.epochs}")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.batch_size < world_size:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch, shared by the {world_size} "
                        f"processes: it must be at least {world_size}")
    if cfg.val_per_class < 0:
        raise UserError(f"--val-per-class must be >= 0, got {cfg.val_per_class}")
    if cfg.val_steps < 0:  # 0: the uniform start alone (clean accuracy when eps is 0)
        raise UserError(f"--val-steps must be >= 0, got {cfg.val_steps}")
    if cfg.precision not in ("fp32", "bf16"):
        raise UserError(f"--precision must be fp32 or bf16, got {cfg.precision!r}")
    if cfg.milestones is not None and any(int(m) < 1 for m in cfg.milestones):
        raise UserError("--milestones must be positive epoch numbers")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")


def _load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read the checkpoint {path}: {err}".splitlines()[0])
    if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND:
        raise UserError(f"{path} is not a robaudit remediation checkpoint")
    return state


def _check_resume(state: dict, fingerprint: dict) -> None:
    saved = state.get("fingerprint", {})
    for key, value in fingerprint.items():
        if saved.get(key) != value:
            raise UserError(
                f"cannot resume: the checkpoint was made with {key}={saved.get(key)!r} but this run has "
                f"{key}={value!r}; rerun with the checkpoint's settings or choose another --out"
            )


def _best_payload(model: nn.Module, cfg: RemediateConfig, method, classes, epoch: int, score: float) -> dict:
    return {"state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "arch": cfg.student, "num_classes": len(classes), "classes": list(classes),
            "method": method.name, "epoch": epoch, "score": score}


def _selected_student(method, student: nn.Module, best: dict, best_path: Path,
                      history: List[dict]) -> Tuple[nn.Module, Optional[int]]:
    """The validation-selected student (best.pt), or the last epoch's without a validation split."""
    current = method.eval_model(student)
    if best["epoch"] is None or not best_path.exists():
        return current, (history[-1]["epoch"] if history else None)
    payload = torch.load(best_path, map_location="cpu", weights_only=True)
    selected = copy.deepcopy(current)
    selected.load_state_dict(payload["state_dict"])
    return selected.eval(), int(payload["epoch"])


def training_block(cfg: RemediateConfig, method, teacher, history: List[dict], selected_epoch,
                   validated: bool) -> dict:
    """results.json "training" (docs/results-schema.md) for the student's audit."""
    records = [h["method"] for h in history]
    temperatures = None
    if records and "tau_adv" in records[0]:
        temperatures = {"tau_adv": [r["tau_adv"] for r in records], "tau_nat": [r["tau_nat"] for r in records]}
    class_weights = [r["class_weights"] for r in records] if records and "class_weights" in records[0] else None
    curves = [{"epoch": h["epoch"], "loss": h["loss"], "val_clean_avg": h.get("val_clean_avg"),
               "val_robust_avg": h.get("val_robust_avg"), "val_robust_worst": h.get("val_robust_worst")}
              for h in history]
    selection = (f"epoch with the highest avg + worst-class PGD-{cfg.val_steps} robust accuracy on "
                 f"{cfg.val_per_class} held-out training images per class (the ABSLD paper selected on "
                 f"the test set)" if validated else "last epoch (no validation split)")
    return {
        "method": method.name,
        "teacher": str(getattr(teacher, "path", None)) if method.needs_teacher else None,
        "epochs": len(history),
        "options": {
            "method": method.options(),
            "student": cfg.student, "student_init": cfg.student_init,
            "epochs": cfg.epochs, "lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
            "batch_size": cfg.batch_size, "milestones": list(method.lr_milestones), "eps": cfg.eps,
            "steps": cfg.steps, "step_size": cfg.step_size, "val_per_class": cfg.val_per_class,
            "val_steps": cfg.val_steps, "augment": cfg.augment, "seed": cfg.seed, "precision": cfg.precision,
            "world_size": distributed.current().world_size, "sync_bn": bool(cfg.sync_bn),
        },
        "curves": curves,
        "temperatures": temperatures,
        "class_weights": class_weights,
        "selected_epoch": selected_epoch,
        "selection": selection,
    }


def _audit_student(cfg: RemediateConfig, exports: Dict[str, dict], test_data, training: dict,
                   out_dir: Path) -> dict:
    """engine.run_scan on the exported student (so results.json describes the shipped file).

    Under torchrun every rank calls run_scan (the engine shards the audit and rank 0 writes
    out_dir/student/); rank 0 sends the exported file's bytes to the others, which load
    them from a private temporary folder, so no rank but 0 needs to read --out.
    """
    from robaudit.audit.engine import ScanConfig, run_scan
    from robaudit.audit.loading import load_model

    exported = next((exports[f]["path"] for f in ("pt2", "torchscript") if exports.get(f, {}).get("ok")), None)
    if exported is None:
        raise UserError("the student could not be exported as .pt2 or TorchScript, so it cannot be audited; "
                        "see the warnings above (best.pt holds its weights)")
    ctx = distributed.current()
    tmp_dir = None
    try:
        if ctx.enabled:
            payload = _on_main(lambda: Path(exported).read_bytes(), share=True)
            if not ctx.is_main:
                tmp_dir = Path(tempfile.mkdtemp(prefix="robaudit-student."))
                exported = str(tmp_dir / Path(exported).name)
                Path(exported).write_bytes(payload)
            del payload
        loaded = load_model(exported, device=cfg.device, num_classes=len(test_data.classes),
                            input_shape=tuple(test_data.x.shape[1:]))
        scan_kwargs = {"attacks": list(cfg.audit_attacks)} if cfg.audit_attacks else {}
        scan_cfg = ScanConfig(out_dir=out_dir / "student", eps=cfg.eps, seed=cfg.seed,
                              batch_size=cfg.audit_batch_size, device=cfg.device,
                              attack_overrides=dict(cfg.audit_overrides), command=cfg.command, **scan_kwargs)
        return run_scan(scan_cfg, model=loaded, data=test_data, extra={"training": training})
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
