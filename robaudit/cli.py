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

from robaudit.errors import UserError


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["robaudit", *sys.argv[1:]])


def _parse_floats(text, flag):
    if text is None:
        return None
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"malformed {flag} {text!r}: give comma-separated numbers, e.g. 0.4914,0.4822,0.4465")
    if not values:
        raise UserError(f"{flag} is empty")
    return values


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
        except (ValueError, ZeroDivisionError, json.JSONDecodeError):
            continue
    return text


def model_options(f):
    """Options shared by every command that loads a model (scan, remediate's teacher)."""
    options = [
        click.option("--format", "model_format", default="auto", show_default=True,
                     help="Force the model format: auto, export (.pt2), torchscript, state_dict, "
                          "checkpoint, safetensors, pickle, onnx."),
        click.option("--arch", default=None, help="Architecture for a state_dict/safetensors file (see `robaudit list`)."),
        click.option("--num-classes", type=int, default=None, help="Expected class count (checked against the dataset)."),
        click.option("--trust-pickle", is_flag=True, help="Allow loading a fully pickled nn.Module (executes code from the file!)."),
        click.option("--mean", default=None, help="Per-channel mean the model expects, e.g. 0.4914,0.4822,0.4465."),
        click.option("--std", default=None, help="Per-channel std the model expects."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def dataset_options(f):
    options = [
        click.option("--dataset", required=True, help="cifar10, cifar100, svhn, demo, an .npz file, or an image folder."),
        click.option("--data-dir", default=None, type=click.Path(), help="Where the dataset lives / is downloaded."),
        click.option("--limit", type=int, default=None, help="Use the first N samples (dataset order)."),
        click.option("--n-per-class", type=int, default=None, help="Use the first K samples of each class."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def load_model_from_options(model_path, *, model_format, arch, num_classes, trust_pickle, mean, std,
                            device, dataset_classes, input_shape):
    from robaudit.audit.loading import load_model

    if num_classes is not None and num_classes != len(dataset_classes):
        raise UserError(f"--num-classes {num_classes} does not match the dataset's "
                        f"{len(dataset_classes)} classes")
    return load_model(model_path, format=model_format, arch=arch, num_classes=len(dataset_classes),
                      trust_pickle=trust_pickle, mean=_parse_floats(mean, "--mean"),
                      std=_parse_floats(std, "--std"), device=device, input_shape=input_shape)


def _check_subset_args(limit, n_per_class):
    for flag, value in (("--limit", limit), ("--n-per-class", n_per_class)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1")


def format_table(results: dict) -> str:
    """Compact per-class table (accuracy %) for stdout."""
    blocks = dict(results["attacks"])
    if results.get("ensemble"):
        blocks["ensemble"] = results["ensemble"]
    names = list(blocks)
    classes = results["dataset"]["classes"]
    width = max([5] + [len(c) for c in classes])
    head = f"{'class':<{width}} {'n':>5} " + " ".join(f"{n:>8}" for n in names)
    lines = [head, "-" * len(head)]
    for i, cls in enumerate(classes):
        n = blocks[names[0]]["per_class"][i]["n"]
        cells = " ".join(f"{100 * blocks[a]['per_class'][i]['accuracy']:8.1f}" for a in names)
        lines.append(f"{cls[:width]:<{width}} {n:>5} {cells}")
    lines.append("-" * len(head))
    for label, key, fmt in (("avg %", "avg", "{:8.1f}"), ("worst %", "worst", "{:8.1f}"), ("NSD", "nsd", "{:8.3f}")):
        cells = []
        for a in names:
            v = blocks[a][key]
            cells.append(f"{'-':>8}" if v is None else fmt.format(100 * v if key != "nsd" else v))
        lines.append(f"{label:<{width}} {'':>5} " + " ".join(cells))
    worst = blocks[names[-1]]
    lines.append(f"worst class ({names[-1]}): {worst['worst_class']} "
                 f"{100 * worst['worst']:.1f}% (NSD = population SD / mean)")
    return "\n".join(lines)


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
@click.option("--split", default="test", show_default=True, help="Dataset split to audit.")
@click.option("--attacks", default="clean,fgsm,pgd,cw,aa", show_default=True,
              help="Comma-separated attacks (see `robaudit list`).")
@click.option("--eps", default="8/255", show_default=True, help="L-inf budget in [0,1] units, e.g. 8/255.")
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
@click.option("--redact-paths", is_flag=True, help="Hide filesystem paths in the report.")
@click.option("--fail-under-worst", type=float, default=None, help="Exit 3 if the ensemble worst-class accuracy is below this.")
@click.option("--fail-over-nsd", type=float, default=None, help="Exit 3 if the ensemble NSD is above this.")
def scan(model, model_format, arch, num_classes, trust_pickle, mean, std, dataset, data_dir, limit,
         n_per_class, split, attacks, eps, seed, batch_size, device, attack_opt, tpgd_temperature,
         iterates, score, out_dir, no_report, redact_paths, fail_under_worst, fail_over_nsd):
    """Audit MODEL class by class and write results.json, samples.npz and report.html."""
    from robaudit.audit.datasets import load_dataset
    from robaudit.audit.engine import ScanConfig, build_attacks, parse_eps, resolve_device, run_scan

    cfg = ScanConfig(out_dir=Path(out_dir), attacks=attacks.split(","), eps=parse_eps(eps), seed=seed,
                     batch_size=batch_size, device=device, iterates=iterates, score=score,
                     attack_overrides=_parse_attack_opts(attack_opt, tpgd_temperature),
                     write_report=not no_report, redact_paths=redact_paths, command=_command_line(),
                     fail_under_worst=fail_under_worst, fail_over_nsd=fail_over_nsd)
    build_attacks(cfg)  # unknown attack / option: fail before loading anything
    _check_subset_args(limit, n_per_class)
    torch_device = resolve_device(device)
    data = load_dataset(dataset, split=split, data_dir=data_dir, limit=limit, n_per_class=n_per_class)
    loaded = load_model_from_options(model, model_format=model_format, arch=arch, num_classes=num_classes,
                                     trust_pickle=trust_pickle, mean=mean, std=std, device=torch_device,
                                     dataset_classes=data.classes, input_shape=tuple(data.x.shape[1:]))
    results = _run_and_print(cfg, loaded, data)
    click.echo(f"wrote {Path(out_dir) / 'results.json'}" + ("" if no_report else f" and {Path(out_dir) / 'report.html'}"))
    return results


def _run_and_print(cfg, loaded, data, extra=None):
    from robaudit.audit.engine import run_scan
    from robaudit.errors import GateFailed

    try:
        results = run_scan(cfg, model=loaded, data=data, extra=extra)
    except GateFailed as gate:
        results = json.loads((Path(cfg.out_dir) / "results.json").read_text())
        click.echo(format_table(results))
        raise gate
    click.echo(format_table(results))
    for flag in results["checks"]:
        click.echo(f"check [{flag['severity']}] {flag['id']}: {flag['message']}", err=True)
    return results


@cli.command()
@click.argument("results_files", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_file", default=None, type=click.Path(),
              help="Output HTML (default: report.html beside the (last) results file).")
@click.option("--redact-paths", is_flag=True, help="Hide filesystem paths in the report.")
def report(results_files, out_file, redact_paths):
    """Render report.html from RESULTS.json, or a comparison from BEFORE.json AFTER.json."""
    from robaudit.audit.report import load_results, render_report

    if len(results_files) > 2:
        raise UserError("give one results.json, or two (BEFORE.json AFTER.json) for a comparison")
    loaded = [load_results(p) for p in results_files]
    after = loaded[-1]
    baseline = loaded[0] if len(loaded) == 2 else None
    out = Path(out_file) if out_file else Path(results_files[-1]).with_name(
        "comparison.html" if baseline else "report.html")
    try:
        render_report(after, out, baseline=baseline, redact_paths=redact_paths)
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror or err}")
    click.echo(f"wrote {out}")


@cli.command(name="list")
def list_cmd():
    """Show registered attacks, architectures, datasets and remediation methods."""
    from robaudit.audit.architectures import ARCHITECTURES
    from robaudit.audit.attacks import ATTACKS
    from robaudit.audit.datasets import DATASETS
    from robaudit.remediate import METHODS

    for title, registry in (("attacks", ATTACKS), ("architectures", ARCHITECTURES),
                            ("datasets", DATASETS), ("methods", METHODS)):
        click.echo(f"{title}:")
        for name, help_text in registry.describe().items():
            click.echo(f"  {name:<16} {help_text}")
    click.echo("architectures: any torchvision classification model name also works (e.g. resnet50)")
    click.echo("datasets: an .npz file path or an image-folder path also works")


def main(argv=None):
    debug = bool(os.environ.get("ROBAUDIT_DEBUG"))
    try:
        cli.main(args=argv, prog_name="robaudit", standalone_mode=False)
    except UserError as err:
        click.echo(f"robaudit: error: {err}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)
    except click.ClickException as err:
        err.show()
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
@click.option("--attacks", default="clean,fgsm,pgd,cw,aa", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
def demo(out_dir, epochs, attacks, seed, device):
    """Offline end-to-end demo: generate data, train a small robust CNN, audit it, report."""
    import torch

    from robaudit.audit.datasets import load_dataset
    from robaudit.audit.demo import train_demo_model
    from robaudit.audit.engine import ScanConfig, build_attacks, resolve_device
    from robaudit.audit.loading import load_model, save_export

    out = Path(out_dir)
    cfg = ScanConfig(out_dir=out, attacks=attacks.split(","), seed=seed, device=device,
                     command=_command_line())
    build_attacks(cfg)
    torch_device = resolve_device(device)
    train = load_dataset("demo", split="train")
    test = load_dataset("demo", split="test")
    click.echo(f"demo: training a small CNN adversarially on {len(train.y)} generated images "
               f"({epochs} epochs, PGD-3 at eps 8/255) ...", err=True)
    model = train_demo_model(train.x, train.y, train.index, len(train.classes), epochs=epochs, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "demo_model.pt2"
    save_export(model, str(model_path), test.x[:2])
    # Audit the saved file, exactly as `robaudit scan demo_model.pt2 --dataset demo` would.
    loaded = load_model(str(model_path), num_classes=len(test.classes), device=torch_device)
    click.echo(f"demo: auditing {model_path} on {len(test.y)} test images ...", err=True)
    _run_and_print(cfg, loaded, test)
    click.echo(f"wrote {out / 'results.json'} and {out / 'report.html'}")
