"""The shared remediation training loop: distil (or adversarially train) a student, then re-audit it.

Every per-batch method (remediate/base.py RemediationMethod: the distillation and
adversarial-training families) trains here; what the loops share with FERD's own loop
(configuration, student, export, checkpoints, the student audit) is in remediate/common.py,
remediate/checkpoints.py and remediate/export.py. A plain loop in the style of the torchvision references: data on the device, one
`method.loss` per batch, SGD + MultiStepLR, one atomic checkpoint per epoch. What
`run_remediate` writes into `out_dir`:

    checkpoint.pt     everything needed to continue exactly (--resume), written atomically
    best.pt           the selected student's weights (validation-selected; see below)
    metrics.csv       one row per epoch: loss, lr, per-class train risks/accuracies, the
                      method's declared per-class state (temperatures, class weights, ...),
                      val clean/robust
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
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from robaudit.audit import distributed
from robaudit.errors import UserError
from robaudit.remediate.base import METHODS, RemediationMethod, create_method
from robaudit.remediate.checkpoints import (CHECKPOINT_KIND, CHECKPOINT_VERSION, prepare_out_dir_for_resume,
                                            restore_rng_state, rng_state, save_atomic, write_metrics_csv)
from robaudit.remediate.common import (PAPER_EPOCHS, PAPER_MILESTONES, RemediateConfig, Runtime, audit_student, augment_batch,
                                       ready_student, check_config, output_classes, resolve_runtime,
                                       scale_milestones, training_block)
from robaudit.remediate.export import export_student
from robaudit.remediate.selection import (default_val_per_class, evaluate_per_class, selection_score,
                                          split_validation, worst_metric)

log = logging.getLogger(__name__)

__all__ = ["PAPER_EPOCHS", "PAPER_MILESTONES", "RemediateConfig", "augment_batch", "check_config",
           "epoch_permutation", "evaluate_per_class", "run_remediate", "scale_milestones", "selection_score",
           "split_validation", "worst_metric"]


# ---------------------------------------------------------------------------- schedule / data
def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of `epoch`: a function of (seed, epoch) only, so resume is exact."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed((int(seed) * 1_000_003 + int(epoch) * 7919 + 17) % (2 ** 63))
    return torch.randperm(n, generator=generator)


def _fingerprint(cfg: RemediateConfig, method_options: dict, milestones, num_classes: int,
                 train_index: torch.Tensor, student_desc: str) -> dict:
    """What a resumed run must share with the checkpoint (everything but the epoch count)."""
    return {
        "method": cfg.method.lower(), "method_options": json.loads(json.dumps(method_options, default=str)),
        "student": student_desc, "num_classes": num_classes, "lr": cfg.lr, "momentum": cfg.momentum,
        "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size, "milestones": list(milestones),
        "val_per_class": cfg.val_per_class, "val_steps": cfg.val_steps, "augment": cfg.augment,
        "seed": cfg.seed, "precision": cfg.precision, "norm": cfg.norm,
        "train_index_sha256": hashlib.sha256(train_index.numpy().tobytes()).hexdigest(),
    }


# ---------------------------------------------------------------------------- the run
@dataclass
class _Run:
    """One run_remediate call once every check has passed: models, method, split and --out."""

    cfg: RemediateConfig
    ctx: distributed.DistContext
    runtime: Runtime
    classes: List[str]
    method: RemediationMethod
    student: nn.Module                  # the plain module: optimised, validated, checkpointed, exported
    student_desc: str
    teacher_module: Optional[nn.Module]
    milestones: Tuple[int, ...]
    train_pos: torch.Tensor
    val_pos: torch.Tensor
    fingerprint: dict

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.csv"

    def prepare_out_dir(self, *, create: bool) -> Optional[dict]:
        return prepare_out_dir_for_resume(self.out_dir, self.checkpoint_path, self.cfg.resume, self.fingerprint,
                                          create=create)


@dataclass
class _DeviceData:
    """The training split on the device, and this rank's share of the held-out split."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    val_eval: Callable[[nn.Module, int], Tuple[torch.Tensor, torch.Tensor]]
    n_val: int


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
    run = _prepare(cfg, teacher, train_data, test_data, student_module)
    cfg = run.cfg   # with the hold-out size resolved
    if dry_run:
        distributed.on_main(lambda: run.prepare_out_dir(create=False))
        return None
    data = _device_data(run, train_data)   # only for a real run: a dry run returned above
    optimizer = torch.optim.SGD(run.student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(run.milestones), gamma=0.1)
    history, best, start_epoch = _restore(run, optimizer, scheduler)
    history, best = _train_epochs(run, data, optimizer, scheduler, history, best, start_epoch)

    def select_and_export() -> Tuple[Optional[int], Dict[str, dict]]:
        selected, selected_epoch = _selected_student(run.method, run.student, best, run.best_path, history)
        exports = (export_student(selected, train_data.x[:1], run.out_dir, cfg.export_formats)
                   if cfg.export_formats else {})
        return selected_epoch, exports

    selected_epoch, exports = distributed.on_main(select_and_export, share=True)
    training = training_block(cfg, run.method, teacher, history, selected_epoch, data.n_val > 0)
    summary = {
        "out_dir": str(run.out_dir), "method": run.method.name, "epochs": len(history),
        "selected_epoch": selected_epoch, "best_score": best["score"],
        "checkpoint": str(run.checkpoint_path), "best": str(run.best_path) if best["epoch"] is not None else None,
        "metrics": str(run.metrics_path), "exports": exports, "training": training, "student_results": None,
    }
    if test_data is not None:
        summary["student_results"] = audit_student(cfg, exports, test_data, training, run.out_dir)
    return summary


def _prepare(cfg: RemediateConfig, teacher, train_data, test_data, student_module) -> _Run:
    """Every check on the options, the data and the models; the student, method and split built."""
    method_cls = METHODS.get(cfg.method)
    if not issubclass(method_cls, RemediationMethod):
        raise UserError(f"method {method_cls.name!r} does not train in the shared loop; "
                        f"run it with METHODS.get({method_cls.name!r}).run(...)")
    ctx = distributed.current()
    method_cls.check_config(cfg, ctx.world_size)
    runtime = resolve_runtime(cfg, ctx)
    classes = list(train_data.classes)
    num_classes = len(classes)
    if len(train_data.y) == 0:
        raise UserError("the training selection is empty; check --limit / --n-per-class")
    example = train_data.x[:1].to(runtime.device)
    teacher_module = _checked_teacher(method_cls, teacher, example, num_classes)
    student, student_desc = _checked_student(cfg, student_module, num_classes, runtime, ctx, example)
    if test_data is not None and len(test_data.classes) != num_classes:
        raise UserError(f"the test split has {len(test_data.classes)} classes but the training split {num_classes}")

    if cfg.val_per_class is None:
        per_class, rule = default_val_per_class(train_data.y, num_classes)
        cfg = dataclasses.replace(cfg, val_per_class=per_class, val_rule=rule)
    milestones = tuple(cfg.milestones) if cfg.milestones is not None else scale_milestones(cfg.epochs)
    method = create_method(cfg.method, num_classes, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps,
                           norm=cfg.norm,
                           seed=cfg.seed, dataset=cfg.dataset or getattr(train_data, "name", None),
                           student_arch=cfg.student if student_module is None else None,
                           **cfg.method_options)
    method.configure(epochs=cfg.epochs, lr_milestones=milestones)
    if getattr(method, "needs_validation", False) and cfg.val_per_class <= 0:
        raise UserError(f"method {method.name!r} updates from a held-out validation split each epoch: "
                        f"pass --val-per-class > 0 (CFA and FRL use 100), or see its options (robaudit list --options)")
    if method_cls.fine_tunes and student_module is None and not cfg.student_init:
        raise UserError(f"method {method.name!r} fine-tunes a trained model: pass it with --student-init PATH")
    train_pos, val_pos = split_validation(train_data.y, train_data.index, cfg.val_per_class, cfg.seed, num_classes)
    fingerprint = _fingerprint(cfg, method.options(), milestones, num_classes, train_data.index[train_pos],
                               student_desc)
    return _Run(cfg=cfg, ctx=ctx, runtime=runtime, classes=classes, method=method, student=student,
                student_desc=student_desc, teacher_module=teacher_module, milestones=milestones,
                train_pos=train_pos, val_pos=val_pos, fingerprint=fingerprint)


def _checked_teacher(method_cls, teacher, example: torch.Tensor, num_classes: int) -> Optional[nn.Module]:
    if not method_cls.needs_teacher:
        return None
    if teacher is None:
        raise UserError(f"method {method_cls.name!r} distils a teacher: pass --teacher PATH")
    # load_model already put it on the device in eval mode; exported (.pt2) and ONNX
    # modules cannot be moved with .to(), so it is used as given. Under torchrun every
    # rank holds its own replica (inference only: no gradients, nothing to synchronise).
    teacher_module = teacher.module
    teacher_module.eval()
    teacher_classes = output_classes(teacher_module, example)
    if teacher_classes != num_classes:
        raise UserError(f"the teacher predicts {teacher_classes} classes but the dataset has {num_classes}; "
                        f"pass the teacher trained on this dataset")
    return teacher_module


def _checked_student(cfg: RemediateConfig, student_module, num_classes: int, runtime: Runtime, ctx,
                     example: torch.Tensor) -> Tuple[nn.Module, str]:
    student, student_desc = ready_student(cfg, student_module, num_classes, runtime, example)
    if cfg.sync_bn and ctx.enabled:
        # Shares the BatchNorm parameters and buffers; state_dict keys are unchanged, so
        # checkpoints resume with or without --sync-bn, and eval mode is plain BatchNorm.
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    return student, student_desc


def _device_data(run: _Run, train_data) -> _DeviceData:
    cfg, device, memory_format = run.cfg, run.runtime.device, run.runtime.memory_format
    # Each rank validates every world-th held-out image; the per-class counts are summed.
    val_mine = run.val_pos[run.ctx.rank::run.ctx.world_size]
    x_val = train_data.x[val_mine].to(device).contiguous(memory_format=memory_format)
    y_val = train_data.y[val_mine].to(device)
    i_val = train_data.index[val_mine].to(device)

    def val_eval(model: nn.Module, steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return evaluate_per_class(model, x_val, y_val, i_val, len(run.classes), eps=cfg.eps,
                                  step_size=cfg.step_size, steps=steps, seed=cfg.seed, norm=cfg.norm,
                                  batch_size=cfg.val_batch_size, autocast=run.runtime.autocast,
                                  memory_format=memory_format,
                                  reduce=distributed.sum_over_ranks if run.ctx.enabled else None)

    return _DeviceData(x=train_data.x[run.train_pos].to(device), y=train_data.y[run.train_pos].to(device),
                       index=train_data.index[run.train_pos].to(device), val_eval=val_eval,
                       n_val=len(run.val_pos))


def _restore(run: _Run, optimizer, scheduler) -> Tuple[List[dict], dict, int]:
    """(history, best, first epoch to train): from the checkpoint with --resume, else a fresh start."""
    state = distributed.on_main(lambda: run.prepare_out_dir(create=True), share=True)
    if state is None:
        return [], {"epoch": None, "score": None}, 1
    run.student.load_state_dict(state["student"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    run.method.load_state_dict(state["method"])
    run.method.to(run.runtime.device)
    restore_rng_state(state["rng"], run.runtime.device)
    history, best = state["history"], state["best"]
    # checkpoint.pt is renamed into place before metrics.csv: a kill in between leaves
    # metrics.csv an epoch short, which no later epoch rewrites if it was the last one.
    distributed.on_main(lambda: write_metrics_csv(run.metrics_path, history, run.classes))
    start_epoch = int(state["epoch"]) + 1
    if run.ctx.is_main:
        world = run.ctx.world_size
        log.info("resuming %s from epoch %d (%d process%s)", run.out_dir, start_epoch, world,
                 "" if world == 1 else "es")
    return history, best, start_epoch


def _train_epochs(run: _Run, data: _DeviceData, optimizer, scheduler, history: List[dict], best: dict,
                  start_epoch: int) -> Tuple[List[dict], dict]:
    cfg, ctx = run.cfg, run.ctx
    raw = run.student
    buffers = list(raw.buffers())
    student = raw
    if ctx.enabled:
        # Every rank attacks and validates with rank 0's BatchNorm running statistics,
        # synchronised explicitly (start of each step, end of each epoch) instead of by
        # DDP at every forward; the parameters DDP keeps identical by averaging gradients.
        device = run.runtime.device
        student = nn.parallel.DistributedDataParallel(
            raw, device_ids=[device.index] if device.type == "cuda" else None, **_ddp_buffer_options())
    tail = len(data.y) % cfg.batch_size
    if ctx.enabled and 0 < tail < ctx.world_size and ctx.is_main:
        log.warning("the last batch of each epoch (%d images) is smaller than the %d processes and is "
                    "skipped; pick --batch-size so that it is not (or a training size that divides)",
                    tail, ctx.world_size)
    show_progress = cfg.progress and ctx.is_main
    epoch_bar = tqdm(total=cfg.epochs, initial=start_epoch - 1, desc="remediate", unit="epoch",
                     file=sys.stderr, disable=not show_progress or None, dynamic_ncols=True)
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            t_epoch = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            loss_sum, seen = _train_one_epoch(run, data, student, buffers, optimizer, epoch, history)
            scheduler.step()
            if ctx.enabled:
                distributed.broadcast_tensors_(buffers)                  # one model on every rank
                run.method.reduce_tallies(distributed.sum_over_ranks)   # the whole epoch's per-class statistics
            record = run.method.end_epoch(epoch, student=raw, val_robust=lambda m, s: data.val_eval(m, s)[1],
                                          val_accuracy=data.val_eval)
            entry = {"epoch": epoch, "lr": lr, "loss": loss_sum / max(seen, 1)}
            improved = _validate_epoch(run, data, entry, best)
            if improved:
                best = {"epoch": epoch, "score": entry["score"]}
            entry.update({"world_size": ctx.world_size, "seconds": time.perf_counter() - t_epoch,
                          "method": record})
            history.append(entry)
            distributed.on_main(lambda: _write_epoch(run, optimizer, scheduler, history, best, epoch, improved))
            epoch_bar.update(1)
            postfix = {"loss": f"{entry['loss']:.4f}"}
            if "val_robust_avg" in entry:
                postfix.update(val_rob=f"{entry['val_robust_avg']:.3f}", worst=f"{entry['val_robust_worst']:.3f}")
            epoch_bar.set_postfix(postfix)
    finally:
        epoch_bar.close()
    return history, best


def _train_one_epoch(run: _Run, data: _DeviceData, student: nn.Module, buffers: List[torch.Tensor], optimizer,
                     epoch: int, history: List[dict]) -> Tuple[float, int]:
    """One pass over the training split; (sum of per-image losses, images) over every rank."""
    cfg, ctx = run.cfg, run.ctx
    world, rank = ctx.world_size, ctx.rank
    student.train()
    n_train = len(data.y)
    order = epoch_permutation(n_train, cfg.seed, epoch).to(run.runtime.device)
    loss_sum, seen = 0.0, 0
    batch_bar = tqdm(total=n_train, desc=f"epoch {epoch}", unit="img", file=sys.stderr, leave=False,
                     disable=not (cfg.progress and ctx.is_main) or None, dynamic_ncols=True)
    try:
        for step, start in enumerate(range(0, n_train, cfg.batch_size)):
            global_idx = order[start:start + cfg.batch_size]
            if len(global_idx) < world:
                continue   # only a last batch smaller than the world: some rank would get no image
            # DistributedSampler semantics on the global batch: the same permutation on
            # every rank, rank r takes every world-th image of the batch.
            idx = global_idx[rank::world]
            distributed.broadcast_tensors_(buffers)
            loss, loss_value, error = None, float("nan"), None
            try:
                optimizer.zero_grad(set_to_none=True)
                loss = _batch_loss(run, data, student, idx, epoch)
                loss_value = float(loss.detach())
            except Exception as err:
                if not ctx.enabled:
                    raise
                error = err   # every rank must hear of it before the gradient all-reduce
            step_sum, step_n = _step_totals(loss_value, len(idx), error, run.runtime.device)
            batch_loss = step_sum / step_n
            if not math.isfinite(batch_loss):
                kept = (f"the last good checkpoint (epoch {history[-1]['epoch']}) is kept in "
                        f"{run.checkpoint_path}" if history else "no checkpoint had been written yet")
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
    return loss_sum, seen


def _batch_loss(run: _Run, data: _DeviceData, student: nn.Module, idx: torch.Tensor, epoch: int) -> torch.Tensor:
    """The method's loss on this rank's share of one batch (augmented; teacher logits if it has one)."""
    cfg, memory_format, autocast = run.cfg, run.runtime.memory_format, run.runtime.autocast
    xb, yb, ib = data.x[idx], data.y[idx], data.index[idx]
    if cfg.augment:
        xb = augment_batch(xb, ib, cfg.seed, epoch)
    xb = xb.contiguous(memory_format=memory_format)
    teacher_logits = None
    if run.teacher_module is not None:
        with torch.inference_mode(), autocast():
            teacher_logits = run.teacher_module(xb)
        # A normal tensor: inference tensors cannot be saved for backward.
        teacher_logits = teacher_logits.float().clone()
    with autocast():
        loss, _ = run.method.loss(student, teacher_logits, xb, yb, ib, epoch)
    return loss


def _validate_epoch(run: _Run, data: _DeviceData, entry: dict, best: dict) -> bool:
    """Adds the held-out clean/robust accuracies and the selection score to `entry`; True if best so far."""
    if not data.n_val:
        return False
    clean, robust = data.val_eval(run.method.eval_model(run.student), run.cfg.val_steps)
    score = selection_score(robust)
    entry.update({"val_clean_avg": float(clean.nanmean()), "val_clean_worst": worst_metric(clean),
                  "val_robust_avg": float(robust.nanmean()), "val_robust_worst": worst_metric(robust),
                  "score": score})
    entry["val_clean"] = _nan_to_none(clean.tolist())
    entry["val_robust"] = _nan_to_none(robust.tolist())
    return best["score"] is None or score > best["score"]


def _write_epoch(run: _Run, optimizer, scheduler, history: List[dict], best: dict, epoch: int,
                 improved: bool) -> None:
    """Rank 0: best.pt when the epoch improved, then checkpoint.pt, then metrics.csv (each atomic)."""
    method, raw = run.method, run.student
    if improved:
        save_atomic(_best_payload(method.eval_model(raw), run.cfg, method, run.classes, epoch, best["score"]),
                    run.best_path)
    save_atomic({
        "kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "epoch": epoch,
        "student": raw.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "method": method.state_dict(),
        "rng": rng_state(run.runtime.device),
        "best": best, "history": history, "fingerprint": run.fingerprint, "classes": run.classes,
    }, run.checkpoint_path)
    write_metrics_csv(run.metrics_path, history, run.classes)


def _nan_to_none(values: List[float]) -> List[Optional[float]]:
    return [None if (v is None or (isinstance(v, float) and math.isnan(v))) else float(v) for v in values]


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
        distributed.agree_keeping_cause(error)
    return step_sum, int(step_n)


def _ddp_buffer_options() -> dict:
    """Turn off DDP's buffer broadcast at every forward (the loop synchronises buffers itself)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in params:      # torch >= 2.13
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


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
