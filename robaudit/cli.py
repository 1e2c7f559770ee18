"""The `robaudit` command: scan, report, remediate, demo, list.

Every user mistake ends as ONE line on stderr and a non-zero exit (robaudit.errors);
results go to files and stdout, progress bars to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from fractions import Fraction
from pathlib import Path

import click

from robaudit.audit import distributed
from robaudit.cli_presets import PRESET_KEY, dataset_notes, describe_presets, eps_note, preset_option
from robaudit.cli_options import (check_subset_args, data_loading_kwargs, data_loading_options, dataset_options,
                                  load_model_from_options, model_options, sign_option, signing_key,
                                  threads_option)
from robaudit.audit.report.text import format_table  # noqa: F401 (robaudit.cli.format_table, as before)
from robaudit.errors import UserError
from robaudit.signing import sign_outputs
from robaudit.workflows import Console, probe_data, say_inferred_arch


_ARGV = None  # the argv main() was called with (in-process calls differ from sys.argv)
CONSOLE = Console(out=click.echo, err=lambda text: click.echo(text, err=True))  # results: stdout; progress: stderr


def _command_line() -> str:
    argv = _ARGV if _ARGV is not None else sys.argv[1:]
    return " ".join(shlex.quote(a) for a in ["robaudit", *argv])


def _parse_attack_opts(pairs, tpgd_temperature):
    """--attack-opt pgd.steps=50 --attack-opt cw.kappa=20 -> {"pgd": {"steps": 50}, ...}."""
    overrides = {}
    for pair in pairs:
        try:
            target, value = pair.split("=", 1)
            attack, param = target.split(".", 1)
        except ValueError:
            raise UserError(f"malformed --attack-opt {pair!r}: use ATTACK.PARAM=VALUE, e.g. pgd.steps=50")
        overrides.setdefault(attack.strip().lower(), {})[param.strip()] = _parse_value(value)
    if tpgd_temperature is not None:
        overrides.setdefault("tpgd", {})["temperature"] = tpgd_temperature
    return overrides


def _parse_value(text: str):
    text = text.strip()
    for parse in (int, lambda t: float(Fraction(t)), json.loads):
        try:
            return parse(text)
        except (ValueError, ZeroDivisionError, OverflowError, json.JSONDecodeError):
            continue
    return text


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="robaudit", prog_name="robaudit")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
def cli(verbose):
    """Class-wise adversarial robustness audits of image classifiers, and fairer distillation."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="robaudit: %(levelname)s: %(message)s")


@cli.command()
@click.argument("model", type=click.Path())
@model_options
@dataset_options
@data_loading_options
@click.option("--split", default="test", show_default=True, help="Dataset split to audit.")
@click.option("--attacks", default="clean,fgsm,pgd,cw,aa", show_default=True,
              help="Comma-separated attacks (see `robaudit list`).")
@click.option("--eps", default="8/255", show_default=True,
              help="Budget in [0,1] units, in --norm: e.g. 8/255 (linf), 0.5 (l2, taken as given).")
@click.option("--norm", type=click.Choice(["linf", "l2", "l1"]), default="linf", show_default=True,
              help="Threat model of every attack: linf or l2 (l1 is refused: not implemented yet).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--attack-opt", multiple=True, help="Override an attack parameter: ATTACK.PARAM=VALUE (repeatable).")
@click.option("--tpgd-temperature", type=float, default=None, help="Temperature of the tpgd attack.")
@click.option("--iterates", type=click.Choice(["any", "final"]), default="any", show_default=True,
              help="any: fooled at any iterate counts (default); final: score the last iterate only.")
@click.option("--score", type=click.Choice(["robust", "adv-only"]), default="robust", show_default=True,
              help="robust: clean-correct and not fooled; adv-only: accuracy on x_adv (Fair-ARD eval).")
@click.option("--out", "out_dir", default="robaudit-out", show_default=True, type=click.Path())
@click.option("--no-report", is_flag=True, help="Write results.json and samples.npz only.")
@click.option("--no-evidence", is_flag=True, help="Do not write evidence.npz (the failures, for `robaudit verify`).")
@click.option("--redact-paths", is_flag=True, help="Hide filesystem paths in the report.")
@click.option("--fail-under-worst", type=float, default=None, help="Exit 3 if the ensemble worst-class accuracy is below this.")
@click.option("--fail-over-nsd", type=float, default=None, help="Exit 3 if the ensemble NSD is above this.")
@click.option("--allow-tf32", is_flag=True,
              help="CUDA: let convolutions/matmuls use TF32 (faster, ~1e-3 relative error; default exact fp32).")
@threads_option
@sign_option
def scan(model, model_format, arch, num_classes, trust_pickle, mean, std, dataset, data_dir, limit,
         n_per_class, split, attacks, eps, norm, seed, batch_size, device, attack_opt, tpgd_temperature,
         iterates, score, out_dir, no_report, redact_paths, fail_under_worst, fail_over_nsd, no_evidence,
         allow_tf32):
    """Audit MODEL class by class and write results.json, samples.npz and report.html.

    MODEL is a model file, a timm Hugging Face folder, or robustbench:[THREAT/]NAME (docs/zoo.md).
    """
    from robaudit.audit.data.datasets import load_dataset
    from robaudit.audit.devices import resolve_device
    from robaudit.audit.engine import ScanConfig, build_attacks, parse_eps

    cfg = ScanConfig(out_dir=Path(out_dir), attacks=attacks.split(","), eps=parse_eps(eps, norm), norm=norm,
                     seed=seed,
                     batch_size=batch_size, device=device, iterates=iterates, score=score,
                     attack_overrides=_parse_attack_opts(attack_opt, tpgd_temperature),
                     write_report=not no_report, redact_paths=redact_paths, command=_command_line(),
                     write_evidence=not no_evidence,
                     fail_under_worst=fail_under_worst, fail_over_nsd=fail_over_nsd, allow_tf32=allow_tf32)
    build_attacks(cfg)  # unknown attack / option: fail before loading anything
    check_subset_args(limit, n_per_class)
    distributed.init_from_env(device)  # no-op unless started by torchrun
    torch_device = resolve_device(device)
    data = load_dataset(dataset, split=split, data_dir=data_dir, limit=limit, n_per_class=n_per_class,
                        expected_classes=num_classes, **data_loading_kwargs(dataset, data_dir))
    loaded = load_model_from_options(model, model_format=model_format, arch=arch, num_classes=num_classes,
                                     trust_pickle=trust_pickle, mean=mean, std=std, device=torch_device,
                                     dataset_classes=data.classes, input_shape=tuple(data.x.shape[1:]),
                                     probe_data=probe_data(data), dataset_name=data.name)
    say_inferred_arch(loaded, CONSOLE)
    note = eps_note(data.name, norm)
    if note and distributed.current().is_main:
        click.echo(f"robaudit: {note}", err=True)
    with sign_outputs(signing_key(), out_dir):
        results = _run_and_print(cfg, loaded, data)
    if distributed.current().is_main:
        click.echo(f"wrote {Path(out_dir) / 'results.json'}"
                   + ("" if no_report else f" and {Path(out_dir) / 'report.html'}"))
    return results


def _run_and_print(cfg, loaded, data, extra=None):
    from robaudit.workflows import scan_and_print

    return scan_and_print(cfg, loaded, data, CONSOLE, extra=extra)


@cli.command()
@click.argument("results_or_report", type=click.Path())
@click.option("--evidence", "evidence_file", default=None, type=click.Path(),
              help="The evidence.npz written next to results.json by `robaudit scan`.")
@click.option("--model", "model_path", default=None, type=click.Path(),
              help="Your copy of the audited model (with --evidence).")
@model_options
@dataset_options(required=False)
@data_loading_options
@click.option("--split", default=None, help="Dataset split [the one results.json recorded].")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--allowed-signers", default=None, type=click.Path(),
              help="ssh-keygen allowed_signers file: every file checked must carry a .sig by a key listed there.")
@threads_option
def verify(results_or_report, evidence_file, model_path, split, batch_size, device, allowed_signers, **options):
    """Re-check every failure an audit claims: load, forward, compare (no attack code).

    Exit 0: verified; 3: something differs; 2: bad input. Options default to what results.json
    recorded (subset, boundary adaptations). See docs/verify.md.
    """
    from robaudit.verify import run_verify_command

    run_verify_command(results_or_report, evidence_file, model_path, split=split, batch_size=batch_size,
                       device=device, options=options, echo=click.echo,
                       extra={"allowed_signers": allowed_signers})


@cli.command()
@click.argument("results_files", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_file", default=None, type=click.Path(),
              help="Output HTML (default: report.html beside the (last) results file; comparison.html "
                   "for two or more).")
@click.option("--redact-paths", is_flag=True, help="Hide filesystem paths in the report.")
@sign_option
def report(results_files, out_file, redact_paths):
    """Render report.html from RESULTS.json, a comparison from BEFORE.json AFTER.json, or an
    N-way comparison (leaderboard, paired tests) from three or more results files."""
    from robaudit.audit.report.render import load_results, render_nway_report, render_report
    from robaudit.workflows import paired_outcomes

    loaded = [load_results(p) for p in results_files]
    if len(loaded) > 2:
        from robaudit.audit.report.nway import Candidate

        out = Path(out_file) if out_file else Path(results_files[-1]).with_name("comparison.html")
        with sign_outputs(signing_key(), out):
            render_nway_report([Candidate(label="", results=r, results_dir=Path(p).parent)
                                for r, p in zip(loaded, results_files)], out, redact_paths=redact_paths)
        click.echo(f"wrote {out}")
        return
    after = loaded[-1]
    baseline = loaded[0] if len(loaded) == 2 else None
    out = Path(out_file) if out_file else Path(results_files[-1]).with_name(
        "comparison.html" if baseline else "report.html")
    paired = None
    if baseline is not None:   # the audits' samples.npz, when they sit next to their results.json
        paired = paired_outcomes(baseline, after, Path(results_files[0]).parent, Path(results_files[-1]).parent)
    try:
        with sign_outputs(signing_key(), out):
            render_report(after, out, baseline=baseline, redact_paths=redact_paths, paired=paired)
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror or err}")
    click.echo(f"wrote {out}")


@cli.command()
@click.argument("results_file", type=click.Path())
@click.option("--format", "fmt", required=True, type=click.Choice(["model-index", "cyclonedx", "junit"]),
              help="model-index: Hugging Face model card metadata (YAML); cyclonedx: a CycloneDX 1.6 ML-BOM "
                   "(JSON); junit: the gates as JUnit XML (one testcase per policy).")
@click.option("--out", "out_file", default=None, type=click.Path(), help="Write here instead of stdout.")
@click.option("--fail-under-worst", type=float, default=None, help="junit: the worst-class gate (as in scan).")
@click.option("--fail-over-nsd", type=float, default=None, help="junit: the NSD gate (as in scan).")
def export(results_file, fmt, out_file, fail_under_worst, fail_over_nsd):
    """Export RESULTS.json as a model-index block, a CycloneDX ML-BOM, or JUnit XML of the gates."""
    from robaudit.exports import write_export

    text = write_export(results_file, fmt, out_file, fail_under_worst=fail_under_worst, fail_over_nsd=fail_over_nsd)
    if out_file is None:
        click.echo(text, nl=False)
    else:
        click.echo(f"wrote {out_file}")


@cli.command(name="list")
@click.option("--options", "show_options", is_flag=True, help="Also list each remediation method's options.")
@click.option("--presets", "show_presets", is_flag=True,
              help="List the named configurations (remediate --preset NAME), each value with its source.")
def list_cmd(show_options, show_presets):
    """Show registered attacks, architectures, datasets and remediation methods."""
    if show_presets:
        click.echo(describe_presets())
        return
    from robaudit.audit.models.architectures import ARCHITECTURES
    from robaudit.audit.attacks import ATTACKS
    from robaudit.audit.data.datasets import DATASETS
    from robaudit.remediate import METHODS

    for title, registry in (("attacks", ATTACKS), ("architectures", ARCHITECTURES),
                            ("datasets", DATASETS), ("methods", METHODS)):
        click.echo(f"{title}:")
        for name, help_text in registry.describe().items():
            if registry is METHODS:
                help_text += _method_needs(METHODS.get(name))
            click.echo(f"  {name:<16} {help_text}")
            if registry is METHODS and show_options:
                click.echo(f"      options (--method-opt KEY=VALUE): {', '.join(METHODS.get(name).option_names())}")
    click.echo("architectures: any torchvision classification model name also works (e.g. resnet50)")
    click.echo("zoo models: --arch timm:NAME, a timm Hugging Face folder, robustbench:[THREAT/]NAME (docs/zoo.md)")
    click.echo("datasets: an .npz file path or an image-folder path also works")


def _method_needs(method) -> str:
    needs = [what for what, needed in (("a teacher", method.needs_teacher),
                                       ("training data", method.needs_training_data)) if needed]
    return f" [needs {' and '.join(needs) or 'nothing'}; {method.default_epochs} epochs by default]"


def main(argv=None):
    global _ARGV
    _ARGV = list(argv) if argv is not None else None
    debug = bool(os.environ.get("ROBAUDIT_DEBUG"))
    try:
        cli.main(args=argv, prog_name="robaudit", standalone_mode=False)
    except UserError as err:
        if distributed.current().is_main:  # under torchrun every rank raises the same agreed line
            click.echo(f"robaudit: error: {err}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)
    except click.ClickException as err:
        # Usage mistakes (unknown option, bad choice, missing argument) get the same one line
        # as every other bad input, with a pointer to --help instead of click's usage block.
        hint = ""
        if isinstance(err, click.UsageError) and err.ctx is not None:
            hint = f" (see `{err.ctx.command_path} --help`)"
        click.echo(f"robaudit: error: {err.format_message()}{hint}", err=True)
        sys.exit(err.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("robaudit: interrupted; re-run the same command with the same --out to resume", err=True)
        sys.exit(130)
    except Exception as err:  # a bug, not the user's fault: still one line unless debugging
        if debug:
            raise
        click.echo(f"robaudit: internal error: {type(err).__name__}: {err} "
                   "(set ROBAUDIT_DEBUG=1 for a traceback)", err=True)
        sys.exit(1)


@cli.command()
@click.option("--out", "out_dir", default="robaudit-demo", show_default=True, type=click.Path())
@click.option("--epochs", type=int, default=5, show_default=True, help="Adversarial-training epochs of the demo model.")
@click.option("--attacks", default="clean,fgsm,pgd,cw,tpgd", show_default=True,
              help="AutoAttack (aa) is left out by default: its FAB-T stage takes many minutes on a "
                   "CPU; add it with --attacks clean,fgsm,pgd,cw,aa.")
@click.option("--remediate-epochs", type=int, default=4, show_default=True,
              help="ABSLD fine-tuning epochs after the audit (0: audit only).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@threads_option
def demo(out_dir, epochs, attacks, remediate_epochs, seed, device):
    """Offline end-to-end demo: generate data, train a small robust CNN, audit it, remediate it."""
    from robaudit.audit.devices import resolve_device
    from robaudit.audit.engine import ScanConfig, build_attacks
    from robaudit.audit.outlock import hold_out_dir
    from robaudit.demo import run_demo

    out = Path(out_dir)
    cfg = ScanConfig(out_dir=out, attacks=attacks.split(","), seed=seed, device=device,
                     command=_command_line())
    build_attacks(cfg)
    torch_device = resolve_device(device)
    with hold_out_dir(out):
        run_demo(cfg, out, torch_device, epochs, remediate_epochs, seed, CONSOLE)


def _method_choices() -> str:
    from robaudit.remediate import METHODS

    return ", ".join(METHODS.names())


@cli.command()
@preset_option
@click.option("--teacher", "teacher_path", default=None, type=click.Path(),
              help="Teacher model file (any format `scan` loads). Needed by the distillation methods "
                   "(`robaudit list` marks them).")
@model_options
@dataset_options
@data_loading_options
@click.option("--student", default=None, help="Student architecture (see `robaudit list`); default resnet18.")
@click.option("--student-init", default=None, type=click.Path(), help="Fine-tune this model file instead of a fresh student.")
@click.option("--method", default=None, help=f"Remediation method [absld]: {_method_choices()} "
              "(see `robaudit list`; each method's options: `robaudit list --options`).")
@click.option("--data-free", is_flag=True,
              help="No training data: the same as --method ferd (distill from the teacher alone with "
                   "synthetic images; the dataset's test split is only audited).")
@click.option("--beta", type=float, default=None,
              help="absld: temperature learning rate (0.1); trades/cfa: KL weight (6).")
@click.option("--tau-min", type=float, default=None, help="absld: lower temperature bound (dataset default).")
@click.option("--tau-max", type=float, default=None, help="absld: upper temperature bound (dataset default).")
@click.option("--alpha", type=float, default=None,
              help="Weight of the adversarial term (5/6; with --data-free, FERD's 1/6).")
@click.option("--reference-compat", is_flag=True, help="absld: reproduce the authors' code behaviour (see docs).")
@click.option("--reweight", type=click.Choice(["fair-ard"]), default=None,
              help="absld: combine with Fair-ARD sample re-weighting (our construction of the journal idea).")
@click.option("--method-opt", multiple=True, help="Any method option: KEY=VALUE (repeatable).")
@click.option("--epochs", type=int, default=None, help="Training epochs [the method's paper: 300; ferd 220].")
@click.option("--schedule", type=click.Choice(["shared", "paper"]), default="shared", show_default=True,
              help="shared: one schedule for every method (RSLAD's 300 epochs, lr 0.1 /10 after 215, 260, "
                   "285, wd 2e-4, batch 128), for equal-budget comparisons; paper: the method's own paper's "
                   "(`robaudit list --options` shows it). --epochs/--lr/... override either.")
@click.option("--lr", type=float, default=None, help="Learning rate [0.1; the schedule's].")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=None, help="Weight decay [2e-4; the schedule's].")
@click.option("--batch-size", type=int, default=None, help="Global batch size [128; the schedule's].")
@click.option("--milestones", default=None, help="lr/10 epochs, e.g. 215,260,285 (default: the paper's, scaled to --epochs).")
@click.option("--steps", type=int, default=10, show_default=True, help="Inner PGD steps.")
@click.option("--eps", default="8/255", show_default=True,
              help="Training and audit budget in [0,1] units, in --norm: e.g. 8/255 (linf), 0.5 (l2), 12 (l1).")
@click.option("--norm", "norm", type=click.Choice(["linf", "l2", "l1"]), default="linf", show_default=True,
              help="Threat model of the inner maximisation (L2/L1: steps of 2.5 * eps / --steps), the "
                   "checkpoint selection and both audits.")
@click.option("--val-per-class", type=int, default=None,
              help="Training images per class held out for checkpoint selection (0: last epoch) "
                   "[100; 25 with >= 50 classes; at most 10% of the smallest class].")
@click.option("--val-steps", type=int, default=20, show_default=True,
              help="PGD steps of the checkpoint-selection attack on the held-out images (0: the random start alone).")
@click.option("--no-augment", is_flag=True, help="No random crop / flip.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "tf32", "bf16"]), default="fp32", show_default=True,
              help="Training arithmetic on CUDA: fp32, tf32 (TF32 matmuls/convs) or bf16 (autocast, inner attack "
                   "included); the audits stay exact fp32.")
@click.option("--compile", "compile_student", is_flag=True, help="torch.compile the student for the training steps.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out exactly.")
@click.option("--sync-bn", is_flag=True, help="torchrun on GPUs: SyncBatchNorm across ranks.")
@click.option("--audit-attacks", default="clean,fgsm,pgd,cw,aa", show_default=True,
              help="Attacks of the before/after audits.")
@click.option("--audit-limit", type=int, default=None, help="Audit only the first N test samples.")
@click.option("--audit-n-per-class", type=int, default=None, help="Audit only the first K test samples per class.")
@click.option("--attack-opt", multiple=True, help="Audit attack parameter: ATTACK.PARAM=VALUE (repeatable).")
@click.option("--export-formats", default="pt2,torchscript,onnx", show_default=True,
              help="Formats the selected student is exported in (the student audit reads pt2, else torchscript).")
@click.option("--out", "out_dir", default="robaudit-remediate", show_default=True, type=click.Path())
@threads_option
@sign_option
def remediate(teacher_path, model_format, arch, num_classes, trust_pickle, mean, std, dataset, data_dir,
              limit, n_per_class, student, student_init, method, data_free, beta, tau_min, tau_max, alpha,
              reference_compat, reweight, method_opt, schedule, epochs, lr, momentum, weight_decay, batch_size,
              milestones, steps, eps, norm, val_per_class, val_steps, no_augment, seed, device, precision,
              compile_student, resume, sync_bn, audit_attacks, audit_limit, audit_n_per_class, attack_opt,
              export_formats, out_dir):
    """Distill a fairer robust student (ABSLD by default), then audit teacher and student."""
    from robaudit.audit.data.datasets import load_dataset
    from robaudit.audit.devices import resolve_device
    from robaudit.audit.engine import ScanConfig, build_attacks, parse_eps
    from robaudit.remediate import DEFAULT_METHOD, METHODS
    from robaudit.remediate.common import RemediateConfig, resolve_schedule
    from robaudit.remediate.export import parse_export_formats
    from robaudit.workflows import remediate_and_compare

    if data_free and method not in (None, "ferd"):
        raise UserError(f"--data-free trains with ferd; drop --method {method} (or pass --method ferd alone)")
    method_cls = METHODS.get("ferd" if data_free else (method or DEFAULT_METHOD))
    options = _method_options(method_cls, method_opt, {
        "--beta": ("beta", beta), "--alpha": ("alpha", alpha), "--reweight": ("reweight", reweight),
        "--reference-compat": ("reference_compat", True if reference_compat else None),
        "--tau-min/--tau-max": ("tau_bounds", _tau_bounds(tau_min, tau_max))})
    if method_cls.needs_teacher and teacher_path is None:
        raise UserError(f"method {method_cls.name} distills from a teacher: pass --teacher MODEL")
    if student is None and student_init is None:
        student = "resnet18"
    check_subset_args(limit, n_per_class)
    check_subset_args(audit_limit, audit_n_per_class)
    distributed.init_from_env(device)  # no-op unless started by torchrun
    eps_value = parse_eps(eps, norm)
    audit_cfg = ScanConfig(out_dir=None, attacks=audit_attacks.split(","), eps=eps_value, norm=norm, seed=seed,
                           device=device, attack_overrides=_parse_attack_opts(attack_opt, None),
                           command=_command_line())
    build_attacks(audit_cfg)
    torch_device = resolve_device(device)
    try:
        milestone_list = [int(m) for m in milestones.split(",")] if milestones else None
    except ValueError:
        raise UserError(f"malformed --milestones {milestones!r}: give epochs like 215,260,285")
    cfg = RemediateConfig(
        out_dir=Path(out_dir), method=method_cls.name, method_options=options, student=student,
        student_init=student_init, momentum=momentum, steps=steps,
        **resolve_schedule(method_cls, schedule, epochs=epochs, lr=lr, weight_decay=weight_decay,
                           batch_size=batch_size, milestones=milestone_list),
        eps=eps_value, norm=norm, val_per_class=val_per_class, val_steps=val_steps, augment=not no_augment,
        seed=seed, device=str(torch_device), precision=precision, compile=compile_student, resume=resume,
        sync_bn=sync_bn, audit_attacks=audit_cfg.attacks, audit_overrides=audit_cfg.attack_overrides,
        command=_command_line(), preset=click.get_current_context().meta.get(PRESET_KEY),
        export_formats=parse_export_formats(export_formats))
    method_cls.check_config(cfg, distributed.current().world_size)  # before anything is loaded or written

    loading = data_loading_kwargs(dataset, data_dir)
    test = load_dataset(dataset, split="test", data_dir=data_dir, limit=audit_limit, n_per_class=audit_n_per_class,
                        **loading)
    train = (load_dataset(dataset, split="train", data_dir=data_dir, limit=limit, n_per_class=n_per_class,
                          **{**loading, "labels": None})
             if method_cls.needs_training_data else test)   # data-free: the test split is only audited
    cfg.dataset = train.name
    for note in dataset_notes(cfg, train.name):
        click.echo(f"robaudit: {note}", err=True)
    teacher = None
    if teacher_path is not None:
        teacher = load_model_from_options(teacher_path, model_format=model_format, arch=arch,
                                          num_classes=num_classes, trust_pickle=trust_pickle, mean=mean,
                                          std=std, device=torch_device, dataset_classes=train.classes,
                                          input_shape=tuple(train.x.shape[1:]),
                                          probe_data=probe_data(test), dataset_name=train.name)
        say_inferred_arch(teacher, CONSOLE)
        if train is not test:
            test.classes[:] = train.classes  # --class-names renames train.classes in place: audit with them too
    with sign_outputs(signing_key(), out_dir):
        remediate_and_compare(cfg, audit_cfg, method_cls, teacher, train, test, CONSOLE)


def _tau_bounds(tau_min, tau_max):
    if (tau_min is None) != (tau_max is None):
        raise UserError("give both --tau-min and --tau-max, or neither")
    return None if tau_min is None else (tau_min, tau_max)


def _method_options(method_cls, method_opt, shortcuts: dict) -> dict:
    """--method-opt KEY=VALUE pairs plus the shared flags the method accepts (its registry entry says which)."""
    options = _parse_attack_opts([f"m.{kv}" for kv in method_opt], None).get("m", {})
    allowed = method_cls.shortcut_options()
    for flag, (key, value) in shortcuts.items():
        if value is None:
            continue
        if key not in allowed:
            raise UserError(f"{flag} is not an option of method {method_cls.name}; pass its options with "
                            f"--method-opt KEY=VALUE ({', '.join(method_cls.option_names())})")
        options[key] = value
    return options
