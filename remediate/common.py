"""What every remediation trainer shares: its configuration, where it computes, the student it
starts from, the results.json "training" block, and the audit of the exported student.

The shared loop (remediate/train.py) and FERD's (remediate/ferd.py) both build their
student with `build_student`, resolve the device with `resolve_runtime`, augment with
`augment_batch`, describe their run with `training_block` and audit the exported student
through `audit_student` (engine.run_scan, the same path as `robaudit scan`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from robaudit.audit import distributed
from robaudit.audit.devices import resolve_device
from robaudit.audit.modes import eval_mode
from robaudit.audit.results_schema import legacy_class_state_keys
from robaudit.audit.rng import per_sample_uniform
from robaudit.errors import UserError
from robaudit.remediate.defaults import DEFAULT_METHOD
from robaudit.remediate.export import EXPORT_FORMATS

log = logging.getLogger(__name__)

PAPER_EPOCHS = 300
PAPER_MILESTONES = (215, 260, 285)   # RSLAD's lr/10 epochs of 300

# rng stream of the training augmentation (+ an epoch or round number), far above the
# methods' (epoch * 16 + purpose) attack streams.
STREAM_AUGMENT = 1 << 30
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
    schedule: str = "shared"                       # which preset set epochs/lr/milestones/wd: shared|paper|own
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    batch_size: int = 128
    milestones: Optional[Sequence[int]] = None     # None: PAPER_MILESTONES scaled to `epochs`
    steps: int = 10                                # inner maximisation steps
    step_size: Optional[float] = None              # None: 2/255 under linf, 2.5 * eps / steps otherwise
    eps: float = 8 / 255
    norm: str = "linf"                             # threat model of the inner maximisation, selection and audits
    val_per_class: Optional[int] = None            # held out of the training split; 0: no selection;
                                                   # None: selection.default_val_per_class (recorded)
    val_rule: str = "given"                        # how val_per_class was set (given, or the default's rule)
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

    def __post_init__(self):
        if self.step_size is None:
            self.step_size = default_step_size(self.norm, self.eps, self.steps)



# The inner maximisation's default step under L-inf (the papers' 2/255); under L2 / L1 the
# attacks' rule (audit.attacks.base.L2_STEP_FACTOR): 2.5 * eps / steps.
LINF_STEP_SIZE = 2 / 255


def default_step_size(norm: str, eps: float, steps: int) -> float:
    """The step size of the inner maximisation when none is given, by norm."""
    from robaudit.audit.attacks.base import L2_STEP_FACTOR

    return LINF_STEP_SIZE if norm == "linf" else L2_STEP_FACTOR * float(eps) / max(int(steps), 1)


def check_config(cfg: RemediateConfig, world_size: int = 1) -> None:
    from robaudit.audit.attacks.ascent import NORMS

    if cfg.norm not in NORMS:
        raise UserError(f"unknown --norm {cfg.norm!r}; choose from: {', '.join(NORMS)}")
    if cfg.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {cfg.epochs}")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.batch_size < world_size:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch, shared by the {world_size} "
                        f"processes: it must be at least {world_size}")
    if cfg.val_per_class is not None and cfg.val_per_class < 0:
        raise UserError(f"--val-per-class must be >= 0, got {cfg.val_per_class}")
    if cfg.val_steps < 0:  # 0: the uniform start alone (clean accuracy when eps is 0)
        raise UserError(f"--val-steps must be >= 0, got {cfg.val_steps}")
    if cfg.precision not in ("fp32", "bf16"):
        raise UserError(f"--precision must be fp32 or bf16, got {cfg.precision!r}")
    if cfg.milestones is not None and any(int(m) < 1 for m in cfg.milestones):
        raise UserError("--milestones must be positive epoch numbers")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")


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
    device = resolve_device(cfg.device)   # torchrun: one GPU per local rank
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


def build_student(cfg: RemediateConfig, num_classes: int, device: torch.device) -> Tuple[nn.Module, str]:
    """(student module, description). Weights from the seed, or from --student-init."""
    if cfg.student_init:
        from robaudit.audit.models.loading import load_model

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
    from robaudit.audit.models.architectures import create_architecture

    arch, _ = student_architecture(cfg)
    torch.manual_seed(cfg.seed)   # the initial weights are a function of the seed
    return create_architecture(arch, num_classes), cfg.student


def student_architecture(cfg: RemediateConfig) -> Tuple[Optional[str], Optional[str]]:
    """(the registered architecture --student names, the resolver's note or None): an alias says
    which form it became (mobilenet_v2 -> the CIFAR mobilenetv2, not torchvision's). The CLI
    prints the note once; training_block records both."""
    if not cfg.student or cfg.student_init:
        return cfg.student, None
    from robaudit.audit.models.architectures import resolve_architecture

    return resolve_architecture(cfg.student)


def ready_student(cfg: RemediateConfig, student_module: Optional[nn.Module], num_classes: int, runtime: Runtime,
                  example: torch.Tensor, *, classes_from: str = "the dataset has") -> Tuple[nn.Module, str]:
    """(student on the device in the runtime's memory format, description), checked to predict
    `num_classes` classes on `example`. student_module (a ready module) replaces cfg's student."""
    if student_module is not None:
        student, student_desc = student_module, type(student_module).__name__
    else:
        student, student_desc = build_student(cfg, num_classes, runtime.device)
    student = student.to(runtime.device)
    if runtime.channels_last:
        student = student.to(memory_format=torch.channels_last)
    student_classes = output_classes(student, example)
    if student_classes != num_classes:
        raise UserError(f"the student predicts {student_classes} classes but {classes_from} {num_classes}")
    return student, student_desc


def output_classes(module: nn.Module, example: torch.Tensor) -> int:
    with torch.inference_mode(), eval_mode(module):
        out = module(example)
    if out.dim() != 2:
        raise UserError(f"the model returns an output of shape {tuple(out.shape)}, not [batch, classes] logits")
    return int(out.shape[1])


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


SHARED_SCHEDULE = {"lr": 0.1, "weight_decay": 2e-4, "batch_size": 128}   # epochs: the method's default


def resolve_schedule(method_cls, preset: str, *, epochs=None, lr=None, weight_decay=None, batch_size=None,
                     milestones=None) -> dict:
    """RemediateConfig's schedule fields: what the user gave, else the preset's.

    preset "shared": SHARED_SCHEDULE, the method's default_epochs and the paper milestones
    scaled to the epochs (scale_milestones); "paper": the method's paper_schedule, its
    milestones scaled to --epochs when that differs from the paper's epoch count.
    """
    if preset not in ("shared", "paper"):
        raise UserError(f"unknown --schedule {preset!r}: choose shared or paper")
    paper = method_cls.paper_schedule
    if not method_cls.shared_schedule and paper is not None:
        preset = "own"   # it trains only under its own schedule, whatever --schedule says
    if preset == "paper" and paper is None:
        raise UserError(f"method {method_cls.name} has no paper schedule of its own; use --schedule shared")
    base = paper if preset in ("paper", "own") else {**SHARED_SCHEDULE, "epochs": method_cls.default_epochs}
    resolved = {"schedule": preset, "epochs": epochs if epochs is not None else base["epochs"],
                "lr": lr if lr is not None else base["lr"],
                "weight_decay": weight_decay if weight_decay is not None else base["weight_decay"],
                "batch_size": batch_size if batch_size is not None else base["batch_size"],
                "milestones": milestones}
    if milestones is None and preset in ("paper", "own") and paper["milestones"] is not None:
        resolved["milestones"] = scale_milestones(resolved["epochs"], base=paper["milestones"],
                                                  base_epochs=paper["epochs"])
    return resolved


def schedule_description(cfg: RemediateConfig, method) -> str:
    """Which schedule ran, for the results: the preset (the method's paper's, its own, or the
    shared one), the values that actually ran, and any of them that differ from the method's
    own schedule (a Python-API run that keeps RemediateConfig's defaults for a method with
    its own schedule trains at those defaults: the record says so instead of hiding it)."""
    paper = getattr(type(method), "paper_schedule", None)
    ran = {"epochs": cfg.epochs, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size}
    values = ", ".join(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"
                       for key, value in ran.items())
    if cfg.schedule == "paper" and paper is not None:
        preset = f"paper: {method.name}'s own schedule ({paper['source']})"
    elif (cfg.schedule == "own" or not type(method).shared_schedule) and paper is not None:
        preset = f"own: {method.name} trains only under its own schedule ({paper['source']})"
    else:
        return ("shared: the same schedule for every method (RSLAD's 300 epochs, lr /10 after 215, 260, 285, "
                f"scaled to --epochs), for equal-budget comparisons; explicit --epochs/--lr/... override it; "
                f"ran: {values}")
    differs = [f"{key} {ran[key]:g} (its schedule: {paper[key]:g})" for key in ("lr", "weight_decay", "batch_size")
               if paper.get(key) is not None and ran[key] is not None and float(ran[key]) != float(paper[key])]
    return f"{preset}; ran: {values}" + (f"; overridden: {', '.join(differs)}" if differs else "")


def training_block(cfg: RemediateConfig, method, teacher, history: List[dict], selected_epoch,
                   validated: bool) -> dict:
    """results.json "training" (docs/results-schema.md) for the student's audit.

    `method` is anything with name, needs_teacher, lr_milestones, options() and class_state()
    (a RemediationMethod, or FERD's description of its run). Each declared ClassState
    becomes a training.class_state trajectory: its key's per-class list of every epoch's record.
    """
    records = [h["method"] for h in history]
    class_state = [{"name": s.result_name, "key": s.key, "label": s.label,
                    "per_epoch": [r.get(s.key) for r in records]}
                   for s in method.class_state() if records and s.key in records[0]]
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
            "student": cfg.student, "student_arch": student_architecture(cfg)[0],
            "student_note": student_architecture(cfg)[1], "student_init": cfg.student_init,
            "epochs": cfg.epochs, "lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
            "batch_size": cfg.batch_size, "milestones": list(method.lr_milestones), "eps": cfg.eps,
            "norm": cfg.norm,
            "steps": cfg.steps, "step_size": cfg.step_size, "val_per_class": cfg.val_per_class,
            "val_per_class_rule": cfg.val_rule,
            "val_steps": cfg.val_steps, "augment": cfg.augment, "seed": cfg.seed, "precision": cfg.precision,
            "world_size": distributed.current().world_size, "sync_bn": bool(cfg.sync_bn),
            "schedule_preset": schedule_description(cfg, method),
        },
        "curves": curves,
        **legacy_class_state_keys(class_state),
        "class_state": class_state,
        "selected_epoch": selected_epoch,
        "selection": selection,
    }


def audit_student(cfg: RemediateConfig, exports: Dict[str, dict], test_data, training: dict,
                   out_dir: Path) -> dict:
    """engine.run_scan and its report (scan_outputs.scan_and_report) on the exported student (so
    results.json describes the shipped file).

    Under torchrun every rank calls run_scan (the engine shards the audit and rank 0 writes
    out_dir/student/); rank 0 sends the exported file's bytes to the others, which load
    them from a private temporary folder, so no rank but 0 needs to read --out.
    """
    from robaudit.audit.engine import ScanConfig
    from robaudit.audit.models.loading import load_model
    from robaudit.audit.scan_outputs import scan_and_report

    exported = next((exports[f]["path"] for f in ("pt2", "torchscript") if exports.get(f, {}).get("ok")), None)
    if exported is None:
        raise UserError("the student could not be exported as .pt2 or TorchScript, so it cannot be audited; "
                        "see the warnings above (best.pt holds its weights)")
    ctx = distributed.current()
    tmp_dir = None
    try:
        if ctx.enabled:
            payload = distributed.on_main(lambda: Path(exported).read_bytes(), share=True)
            if not ctx.is_main:
                tmp_dir = Path(tempfile.mkdtemp(prefix="robaudit-student."))
                exported = str(tmp_dir / Path(exported).name)
                Path(exported).write_bytes(payload)
            del payload
        loaded = load_model(exported, device=cfg.device, num_classes=len(test_data.classes),
                            input_shape=tuple(test_data.x.shape[1:]))
        scan_kwargs = {"attacks": list(cfg.audit_attacks)} if cfg.audit_attacks else {}
        scan_cfg = ScanConfig(out_dir=out_dir / "student", eps=cfg.eps, norm=cfg.norm, seed=cfg.seed,
                              batch_size=cfg.audit_batch_size, device=cfg.device,
                              attack_overrides=dict(cfg.audit_overrides), command=cfg.command, **scan_kwargs)
        return scan_and_report(scan_cfg, model=loaded, data=test_data, extra={"training": training})
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def scale_milestones(epochs: int, base: Sequence[int] = PAPER_MILESTONES,
                     base_epochs: int = PAPER_EPOCHS) -> Tuple[int, ...]:
    """The paper's lr milestones at the same fractions of an `epochs`-long run."""
    if epochs == base_epochs:
        return tuple(int(m) for m in base)
    scaled = [min(max(1, round(m * epochs / base_epochs)), epochs) for m in base]
    return tuple(dict.fromkeys(scaled))
