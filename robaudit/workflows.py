"""What the `robaudit` commands and the library both run: model loading from options, one
audit with its printout, remediation with its before/after comparison, and the demo.

The CLI (robaudit/cli.py) only parses options and calls these; the library (robaudit/api.py)
calls them with a silent `Console`. Every audit goes through scan_outputs.scan_and_report
(engine.run_scan, the report, the gates).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from robaudit.audit import distributed
from robaudit.audit.report.text import before_after_line, format_table
from robaudit.errors import GateFailed, UserError

__all__ = ["Console", "SILENT", "STDERR", "load_model_with_options", "probe_data", "say_inferred_arch",
           "scan_and_print", "print_summary", "remediate_and_compare", "print_comparison", "paired_outcomes"]


def _quiet(_text: str) -> None:
    return None


@dataclass(frozen=True)
class Console:
    """Where a workflow speaks: `out` takes results (the CLI's stdout), `err` progress and
    notes (the CLI's stderr). The library's default says nothing."""
    out: Callable[[str], None] = _quiet
    err: Callable[[str], None] = _quiet


SILENT = Console()
STDERR = Console(err=lambda text: print(text, file=sys.stderr))


def _parse_floats(text, flag):
    if text is None or isinstance(text, (list, tuple)):
        return None if text is None else [float(v) for v in text]
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"malformed {flag} {text!r}: give comma-separated numbers, e.g. 0.4914,0.4822,0.4465")
    if not values:
        raise UserError(f"{flag} is empty")
    return values


def load_model_with_options(model_path, *, device, dataset_classes, input_shape, model_format="auto", arch=None,
                            num_classes=None, trust_pickle=False, mean=None, std=None, input_layout=None,
                            input_range=None, output=None, output_name=None, class_names=None, class_map=None,
                            probe_data=None, dataset_name=None, zoo_dir=None):
    """load_model with `scan`'s model options; returns a LoadedModel.

    dataset_classes is the dataset's class list (EvalData.classes): with class_names its
    entries are replaced in place, so the results name the classes as the user asked.
    probe_data: (x, y) of the audited data, used to tell same-key architecture forms apart.
    mean/std: a list of floats or the command line's comma-separated text.
    """
    from robaudit.audit.models.loading import load_model

    boundary = {"input_layout": input_layout or "auto", "input_range": input_range or "0-1",
                "output": output or "auto", "output_name": output_name, "class_names": class_names,
                "class_map": class_map}
    if num_classes is not None and num_classes != len(dataset_classes):
        raise UserError(f"--num-classes {num_classes} does not match the dataset's "
                        f"{len(dataset_classes)} classes")
    loaded = load_model(model_path, format=model_format, arch=arch, num_classes=len(dataset_classes),
                        trust_pickle=trust_pickle, mean=_parse_floats(mean, "--mean"),
                        std=_parse_floats(std, "--std"), device=device, input_shape=input_shape,
                        dataset_classes=list(dataset_classes), probe_data=probe_data, dataset=dataset_name,
                        zoo_dir=zoo_dir, **boundary)
    if loaded.class_names is not None and isinstance(dataset_classes, list):
        dataset_classes[:] = loaded.class_names
    return loaded


def probe_data(data):
    """(x, y) for telling same-key architectures apart, as tensors (a lazy folder decodes at most 256)."""
    import torch

    from robaudit.audit.models.arch_inference import probe_batch

    x, y = probe_batch(data.x, data.y)
    return (x if isinstance(x, torch.Tensor) else x[:]), y


def say_inferred_arch(loaded, console: Console) -> None:
    if loaded.arch_inferred is not None and distributed.current().is_main:
        console.err(f"robaudit: no --arch given: the weights are {loaded.arch} "
                    f"({loaded.arch_inferred['how']}; see model.arch_inferred)")


def scan_and_print(cfg, loaded, data, console: Console, extra=None) -> dict:
    """One audit (scan_and_report); its table on console.out and its checks on console.err,
    also when a gate fails (then GateFailed is raised after the printout)."""
    from robaudit.audit.scan_outputs import scan_and_report

    try:
        results = scan_and_report(cfg, model=loaded, data=data, extra=extra)
    except GateFailed:
        print_summary(json.loads((Path(cfg.out_dir) / "results.json").read_text()), console)
        raise
    print_summary(results, console)
    return results


def print_summary(results: dict, console: Console) -> None:
    if not distributed.current().is_main:  # torchrun: rank 0 speaks for all
        return
    console.out(format_table(results))
    for flag in results["checks"]:
        console.err(f"check [{flag['severity']}] {flag['id']}: {flag['message']}")


def remediate_and_compare(cfg, audit_cfg, method_cls, teacher, train, test, console: Console,
                          student_module=None) -> dict:
    """Teacher audit (before) -> training (the method's trainer) -> student audit (after) -> comparison.

    Returns the trainer's summary (with "student_results") plus "teacher_results" (None
    without a teacher). student_module: a ready nn.Module to train instead of cfg.student.
    """
    from robaudit.audit.outlock import hold_out_dir
    from robaudit.remediate.common import student_architecture

    def train_student(dry_run=False):
        return method_cls.run(cfg, teacher=teacher, train_data=train, test_data=test, dry_run=dry_run,
                              **({"student_module": student_module} if student_module is not None else {}))

    train_student(dry_run=True)  # every check on options, data and models before a file is written
    out = Path(cfg.out_dir)
    with hold_out_dir(out):
        before = None
        if teacher is not None:
            console.err(f"remediate: auditing the teacher into {out / 'teacher'} ...")
            before = scan_and_print(replace(audit_cfg, out_dir=out / "teacher"), teacher, test, console)
        student_arch, student_note = student_architecture(cfg)
        if student_note is not None and student_arch != cfg.student.strip().lower():   # an alias was resolved
            console.err(f"robaudit: --student {student_note}")
        console.err(f"remediate: training a {cfg.student or 'student'} with {cfg.method} "
                    f"for {cfg.epochs} epochs ...")
        summary = train_student()
        print_comparison(before, summary["student_results"], out, console)
    return {**summary, "teacher_results": before}


def paired_outcomes(before: dict, after: dict, before_dir: Path, after_dir: Path):
    """(PairedOutcomes or None, why not) of the compared attack, from each audit's samples.npz."""
    from robaudit.audit.paired import load_paired
    from robaudit.audit.report.comparison import comparison_key

    return load_paired(before_dir, after_dir, before, after, comparison_key(after, before))


def print_comparison(before, after, out: Path, console: Console, before_dir: Optional[Path] = None) -> None:
    """Student table, before/after summary line, and the comparison report (or a plain one)."""
    from robaudit.audit.report.render import render_report

    if not distributed.current().is_main:  # torchrun: rank 0 writes and speaks for all
        return

    console.out(format_table(after))
    render_report(after, out / "report.html", baseline=before,
                  paired=(paired_outcomes(before, after, before_dir or out / "teacher", out / "student")
                          if before is not None else None))
    if before is not None:
        console.out(before_after_line(before, after))
    console.out(f"wrote {out / 'report.html'} and {out / 'student' / 'results.json'}")
