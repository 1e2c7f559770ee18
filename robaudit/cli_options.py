"""Click options shared by the commands that load a model and a dataset (scan, remediate).

Model-boundary options (format, arch, normalisation, ...) live here in one place so
`scan`, `remediate --teacher` and torchrun runs adapt models identically.
"""

from __future__ import annotations

import click

from robaudit.errors import UserError


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


def check_subset_args(limit, n_per_class):
    for flag, value in (("--limit", limit), ("--n-per-class", n_per_class)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1")


