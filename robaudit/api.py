"""robaudit as a library: `scan`, `remediate`, `quick_audit`.

    import robaudit
    audit = robaudit.scan(model, (x, y), attacks=["clean", "pgd"], eps=8 / 255)
    audit.worst, audit.nsd, audit.per_class
    audit.compare(robaudit.scan(model2, (x, y), attacks=["clean", "pgd"])).write_report("cmp.html")

Every call runs the engine `robaudit scan` runs (audit/engine.py run_scan through
audit/scan_outputs.py), with the same seeding (seed + the sample's position) and the same
results.json contract; `out=DIR` writes the same files. Bad input raises
robaudit.errors.UserError with one line saying what to fix. docs/library.md has a tour.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from robaudit.audit.engine import DEFAULT_ATTACKS, ScanConfig, build_attacks, parse_eps
from robaudit.results import Audit, Remediation
from robaudit.workflows import SILENT, Console

__all__ = ["scan", "remediate", "quick_audit", "load_data", "load_audited_model"]

# How each model argument is read (the same boundary options as `robaudit scan`).
BOUNDARY_KEYS = ("mean", "std", "input_layout", "input_range", "output", "output_name", "class_map")


def _module_device(module: nn.Module) -> Optional[torch.device]:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return None


def _device_for(model, device: str) -> str:
    """'auto' with an nn.Module: the module's own device (it is not moved); else as `scan` reads it."""
    from robaudit.audit.devices import resolve_device

    if device == "auto" and isinstance(model, nn.Module):
        own = _module_device(model)
        if own is not None:
            return str(own)
    return str(resolve_device(device))


def load_data(data, *, split: str = "test", data_dir=None, limit: Optional[int] = None,
              n_per_class: Optional[int] = None, classes: Optional[Sequence[str]] = None,
              num_classes: Optional[int] = None):
    """An EvalData from a dataset name or path (as `--dataset`), (x, y), a torch Dataset or a DataLoader."""
    from robaudit.audit.data import in_memory
    from robaudit.audit.data.datasets import EvalData, load_dataset
    from robaudit.errors import UserError

    if isinstance(data, EvalData):
        return data
    if isinstance(data, (str, os.PathLike)):
        loaded = load_dataset(data, split=split, data_dir=data_dir, limit=limit, n_per_class=n_per_class,
                              class_names=None)
        if classes is not None:
            if len(classes) != len(loaded.classes):
                raise UserError(f"classes= names {len(classes)} classes but {data} has {len(loaded.classes)}")
            loaded.classes[:] = [str(c) for c in classes]
        return loaded
    if limit is not None or n_per_class is not None:
        raise UserError("limit= / n_per_class= select from a named dataset; slice in-memory data yourself")
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return in_memory.from_arrays(data[0], data[1], classes=classes, num_classes=num_classes)
    if isinstance(data, (torch.utils.data.Dataset, torch.utils.data.DataLoader)):
        return in_memory.from_torch(data, classes=classes, num_classes=num_classes)
    raise UserError(f"cannot read data of type {type(data).__name__}: pass a dataset name or path, "
                    "(x, y) tensors, a torch Dataset or a DataLoader")


def load_audited_model(model, data, *, device: str = "cpu", model_format: str = "auto", arch=None,
                       trust_pickle: bool = False, zoo_dir=None, **boundary):
    """A LoadedModel from an nn.Module, an ExportedProgram, a LoadedModel, or a path/zoo name
    in any format `robaudit scan` loads; adapted to `data` (an EvalData)."""
    from robaudit.audit.models.in_memory import wrap_exported, wrap_module
    from robaudit.audit.models.loading import LoadedModel
    from robaudit.errors import UserError
    from robaudit.workflows import load_model_with_options, probe_data

    unknown = sorted(set(boundary) - set(BOUNDARY_KEYS) - {"class_names"})
    if unknown:
        raise UserError(f"unknown model option {unknown[0]!r}; choose from: {', '.join(BOUNDARY_KEYS)}")
    shape = tuple(data.x.shape[1:])
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, torch.export.ExportedProgram):
        return wrap_exported(model, dataset_classes=data.classes, input_shape=shape, device=device, **boundary)
    if isinstance(model, nn.Module):
        boundary.pop("class_names", None)
        return wrap_module(model, dataset_classes=data.classes, input_shape=shape, device=device, **boundary)
    if isinstance(model, (str, os.PathLike)):
        return load_model_with_options(os.fspath(model), model_format=model_format, arch=arch,
                                       trust_pickle=trust_pickle, device=device, dataset_classes=data.classes,
                                       input_shape=shape, probe_data=probe_data(data), dataset_name=data.name,
                                       zoo_dir=zoo_dir, **boundary)
    raise UserError(f"cannot audit a {type(model).__name__}: pass an nn.Module, an ExportedProgram or a model path")


def _scan_config(*, out, attacks, eps, norm, seed, batch_size, device, attack_options, iterates, score,
                 report, redact_paths, fail_under_worst, fail_over_nsd, command=None) -> ScanConfig:
    cfg = ScanConfig(out_dir=Path(out) if out is not None else None,
                     attacks=[attacks] if isinstance(attacks, str) and "," not in attacks else
                     (attacks.split(",") if isinstance(attacks, str) else list(attacks)),
                     eps=parse_eps(eps, norm), norm=norm, seed=seed, batch_size=batch_size, device=device,
                     iterates=iterates, score=score, attack_overrides=dict(attack_options or {}),
                     write_report=report, redact_paths=redact_paths, command=command,
                     fail_under_worst=fail_under_worst, fail_over_nsd=fail_over_nsd)
    build_attacks(cfg)   # an unknown attack or option fails before anything loads
    return cfg


def scan(model, data, *, attacks: Union[str, Iterable[str]] = DEFAULT_ATTACKS, eps: Union[float, str] = 8 / 255,
         norm: str = "linf", out=None, seed: int = 0, batch_size: int = 256, device: str = "auto",
         attack_options: Optional[dict] = None, iterates: str = "any", score: str = "robust",
         split: str = "test", data_dir=None, limit: Optional[int] = None, n_per_class: Optional[int] = None,
         classes: Optional[Sequence[str]] = None, num_classes: Optional[int] = None, report: bool = True,
         redact_paths: bool = False, fail_under_worst: Optional[float] = None,
         fail_over_nsd: Optional[float] = None, model_format: str = "auto", arch: Optional[str] = None,
         trust_pickle: bool = False, console: Console = SILENT, **model_boundary) -> Audit:
    """Audit `model` class by class on `data`; return an `Audit`.

    model: an nn.Module taking [0, 1] NCHW images (see `mean`/`std`/`input_range` otherwise),
    an ExportedProgram, or a path / zoo name in any format `robaudit scan` loads.
    data: a dataset name or path (`split`, `data_dir`, `limit`, `n_per_class` as on the command
    line), (x, y) tensors or arrays, a torch Dataset, or a DataLoader without shuffling.
    attacks: names (`robaudit list`); attack_options: {"pgd": {"steps": 50}} (--attack-opt).
    eps: a number or text like "8/255", in [0, 1] image units (linf; a number above 1 reads as
    k/255, as --eps does). out: a folder for results.json, samples.npz and (report=True)
    report.html; None writes nothing. device "auto": an nn.Module's own device, else CUDA when
    present. The gates raise robaudit.errors.GateFailed after the files are written.
    Further keywords are the boundary options: mean, std, input_layout, input_range, output,
    output_name, class_map (as --mean ... --class-map).
    """
    cfg = _scan_config(out=out, attacks=attacks, eps=eps, norm=norm, seed=seed, batch_size=batch_size,
                       device=device, attack_options=attack_options, iterates=iterates, score=score,
                       report=report, redact_paths=redact_paths, fail_under_worst=fail_under_worst,
                       fail_over_nsd=fail_over_nsd)
    evaluated = load_data(data, split=split, data_dir=data_dir, limit=limit, n_per_class=n_per_class,
                          classes=classes, num_classes=num_classes)
    cfg.device = _device_for(model, device)
    was_training = model.training if isinstance(model, nn.Module) else None
    try:
        loaded = load_audited_model(model, evaluated, device=cfg.device, model_format=model_format, arch=arch,
                                    trust_pickle=trust_pickle, **model_boundary)
        from robaudit.workflows import scan_and_print

        results = scan_and_print(cfg, loaded, evaluated, console)
    finally:
        if was_training:
            model.train()
    return Audit(results, out_dir=cfg.out_dir)


def quick_audit(model: nn.Module, x, y, *, eps: Union[float, str] = 8 / 255, norm: str = "linf", steps: int = 5,
                seed: int = 0, batch_size: int = 256, classes: Optional[Sequence[str]] = None,
                num_classes: Optional[int] = None, prefix: str = "robaudit/") -> dict:
    """A cheap audit for a training loop: clean and PGD-`steps` on fixed (x, y); a flat dict of floats.

    Keys (with `prefix`): clean_acc, robust_acc (mean over classes), robust_worst,
    robust_worst_class (its index), robust_nsd, clean/<class> and robust/<class> per class.
    The model's train/eval mode is restored; its parameters and their .grad are not touched.
    Same engine and seeding as `scan`, so two calls on the same weights give the same numbers.
    """
    audit = scan(model, (x, y), attacks=["clean", "pgd"], eps=eps, norm=norm, seed=seed, batch_size=batch_size,
                 attack_options={"pgd": {"steps": steps}}, classes=classes, num_classes=num_classes, report=False)
    robust, clean = audit.block("ensemble"), audit.block("clean")
    flat = {"clean_acc": clean.avg, "robust_acc": robust.avg, "robust_worst": robust.worst,
            "robust_worst_class": None if robust.worst_record is None else robust.worst_record.index,
            "robust_nsd": robust.nsd}
    for c, r in zip(clean.per_class, robust.per_class):
        flat[f"clean/{c.name}"] = c.accuracy
        flat[f"robust/{r.name}"] = r.accuracy
    return {f"{prefix}{key}": value for key, value in flat.items()}


def remediate(teacher, data, *, student: Optional[Union[str, nn.Module]] = None, method: Optional[str] = None,
              out="robaudit-remediate", method_options: Optional[dict] = None, schedule: str = "shared",
              epochs: Optional[int] = None, lr: Optional[float] = None, weight_decay: Optional[float] = None,
              batch_size: Optional[int] = None, milestones: Optional[Sequence[int]] = None, momentum: float = 0.9,
              steps: int = 10, eps: Union[float, str] = 8 / 255, norm: str = "linf",
              val_per_class: Optional[int] = None, val_steps: int = 20, augment: bool = True, seed: int = 0,
              device: str = "auto", precision: str = "fp32", resume: bool = False,
              audit_attacks: Union[str, Iterable[str]] = DEFAULT_ATTACKS, audit_options: Optional[dict] = None,
              limit: Optional[int] = None, n_per_class: Optional[int] = None, audit_limit: Optional[int] = None,
              audit_n_per_class: Optional[int] = None, data_dir=None, console: Console = SILENT,
              **model_boundary) -> Remediation:
    """Distill a fairer robust student (ABSLD by default), auditing teacher and student.

    teacher: as `scan`'s model (None for methods without one: sat, trades, cfa). data: a dataset
    name or .npz path with train and test splits. student: an architecture name (default
    resnet18) or an nn.Module to fine-tune. The rest are `robaudit remediate`'s options.
    Writes what `robaudit remediate --out` writes; returns the student and both audits.
    """
    from robaudit.audit.devices import resolve_device
    from robaudit.audit.models.loading import load_model
    from robaudit.remediate import DEFAULT_METHOD, METHODS
    from robaudit.remediate.common import RemediateConfig, resolve_schedule
    from robaudit.workflows import remediate_and_compare
    from robaudit.errors import UserError

    method_cls = METHODS.get(method or DEFAULT_METHOD)
    if method_cls.needs_teacher and teacher is None:
        raise UserError(f"method {method_cls.name} distills from a teacher: pass teacher=")
    audit_cfg = _scan_config(out=None, attacks=audit_attacks, eps=eps, norm=norm, seed=seed, batch_size=256,
                             device=device, attack_options=audit_options, iterates="any", score="robust",
                             report=True, redact_paths=False, fail_under_worst=None, fail_over_nsd=None)
    torch_device = resolve_device(device)
    student_module = student if isinstance(student, nn.Module) else None
    cfg = RemediateConfig(
        out_dir=Path(out), method=method_cls.name, method_options=dict(method_options or {}),
        student=None if student_module is not None else (student or "resnet18"), momentum=momentum, steps=steps,
        **resolve_schedule(method_cls, schedule, epochs=epochs, lr=lr, weight_decay=weight_decay,
                           batch_size=batch_size, milestones=list(milestones) if milestones else None),
        eps=audit_cfg.eps, norm=norm, val_per_class=val_per_class, val_steps=val_steps, augment=augment, seed=seed,
        device=str(torch_device), precision=precision, resume=resume, audit_attacks=audit_cfg.attacks,
        audit_overrides=audit_cfg.attack_overrides)
    method_cls.check_config(cfg, 1)
    test = load_data(data, split="test", data_dir=data_dir, limit=audit_limit, n_per_class=audit_n_per_class)
    train = (load_data(data, split="train", data_dir=data_dir, limit=limit, n_per_class=n_per_class)
             if method_cls.needs_training_data else test)
    cfg.dataset = train.name
    loaded_teacher = None
    if teacher is not None:
        loaded_teacher = load_audited_model(teacher, train, device=str(torch_device), **model_boundary)
    summary = remediate_and_compare(cfg, audit_cfg, method_cls, loaded_teacher, train, test, console,
                                    student_module=student_module)
    exported = next((summary["exports"][f]["path"] for f in ("pt2", "torchscript")
                     if summary["exports"].get(f, {}).get("ok")), None)
    student_model = (load_model(exported, device=str(torch_device), num_classes=len(test.classes),
                                input_shape=tuple(test.x.shape[1:])).module if exported else None)
    teacher_results = summary.get("teacher_results")
    return Remediation(student=student_model,
                       student_audit=Audit(summary["student_results"], out_dir=Path(out) / "student"),
                       teacher_audit=(Audit(teacher_results, out_dir=Path(out) / "teacher")
                                      if teacher_results is not None else None),
                       summary=summary, out_dir=Path(out))
