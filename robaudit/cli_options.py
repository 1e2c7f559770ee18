"""Click options shared by the commands that load a model and a dataset (scan, remediate).

Model-boundary options (format, arch, normalisation, ...) live here in one place so
`scan`, `remediate --teacher` and torchrun runs adapt models identically.
"""

from __future__ import annotations

import functools
import inspect

import click

from robaudit.errors import UserError


# Options that adapt the model's boundary (audit/models/adapters.py). A command whose function
# does not take them as parameters gets them through the click context instead, where
# `load_model_from_options` reads them, so every command using @model_options honours them.
BOUNDARY_OPTIONS = ("input_layout", "input_range", "output", "output_name", "class_names", "class_map")
# Stashed the same way: where robustbench:NAME checkpoints are cached (audit/models/zoo.py).
STASHED_OPTIONS = BOUNDARY_OPTIONS + ("zoo_dir",)
_CONTEXT_KEY = "robaudit.model_boundary"


def model_options(f):
    """Options shared by every command that loads a model (scan, remediate's teacher)."""
    options = [
        click.option("--format", "model_format", default="auto", show_default=True,
                     help="Force the model format: auto, export (.pt2), torchscript, state_dict, "
                          "checkpoint, safetensors, pickle, onnx."),
        click.option("--arch", default=None,
                     help="Architecture for a state_dict/safetensors file (see `robaudit list`; "
                          "timm:NAME builds it with timm); default: the registered one its keys and shapes fit."),
        click.option("--zoo-dir", type=click.Path(), default=None,
                     help="Cache of robustbench:[THREAT/]NAME checkpoints, laid out as RobustBench's "
                          "DIR/DATASET/THREAT/NAME.pt [default: $ROBAUDIT_ZOO_DIR, else "
                          "~/.cache/robaudit/robustbench]."),
        click.option("--num-classes", type=int, default=None, help="Expected class count (checked against the dataset)."),
        click.option("--trust-pickle", is_flag=True, help="Allow loading a fully pickled nn.Module (executes code from the file!)."),
        click.option("--mean", default=None,
                     help="Per-channel mean the model expects, in its input units (after --input-range), "
                          "e.g. 0.4914,0.4822,0.4465."),
        click.option("--std", default=None, help="Per-channel std the model expects, in its input units."),
        click.option("--input-layout", type=click.Choice(["auto", "nchw", "nhwc"]), default="auto",
                     show_default=True,
                     help="Layout the model takes. auto: NHWC if its declared input (ONNX, .pt2) has "
                          "the channels last, else NCHW."),
        click.option("--input-range", type=click.Choice(["0-1", "0-255"]), default="0-1", show_default=True,
                     help="Pixel range the model takes; images are scaled before --mean/--std. "
                          "--eps stays in [0,1] units."),
        click.option("--output", type=click.Choice(["auto", "logits", "probs", "log-probs"]), default="auto",
                     show_default=True,
                     help="What the model returns. auto: probabilities (rows >= 0 summing to 1) are "
                          "detected and attacked as their log."),
        click.option("--output-name", default=None,
                     help="Which output to audit when the model has several (ONNX output name, dict key "
                          "or tuple index; default: the first [B, C] float output)."),
        click.option("--class-names", type=click.Path(), default=None,
                     help="File of class names (one per line, or a JSON list) in dataset label order; "
                          "replaces the dataset's names."),
        click.option("--class-map", type=click.Path(), default=None,
                     help="JSON file mapping model output index -> dataset class (index or name), "
                          "e.g. [3, 0, 1, 2] or {\"0\": \"cat\"}; must be a permutation."),
    ]
    try:
        accepted = inspect.signature(f).parameters
    except (TypeError, ValueError):
        accepted = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    stashed = [name for name in STASHED_OPTIONS if name not in accepted and not takes_all]

    return _stashing_options(f, options, stashed, _CONTEXT_KEY)


def _stashing_options(f, options, names, context_key):
    """Decorate command `f` with click `options`; the values of `names` are not passed to
    `f` but stashed in the click context's meta[context_key] (read back by helpers)."""
    @functools.wraps(f)
    def command(*args, **kwargs):
        stashed = {name: kwargs.pop(name) for name in names if name in kwargs}
        ctx = click.get_current_context(silent=True)
        if ctx is not None:
            ctx.meta[context_key] = stashed
        return f(*args, **kwargs)

    for option in reversed(options):
        command = option(command)
    return command


def _set_threads(ctx, param, value):
    if value is None:
        return None
    if value < 1:
        raise UserError(f"--threads must be at least 1, got {value}")
    import torch

    # torch's default is one thread per core; on a shared or busy machine that
    # oversubscribes the cores and small-batch CPU passes get many times slower.
    torch.set_num_threads(value)
    return value


def threads_option(f):
    """--threads N: torch's CPU threads for this run (applied before anything loads)."""
    return click.option("--threads", type=int, default=None, expose_value=False, is_eager=True,
                        callback=_set_threads,
                        help="CPU threads torch may use (default: one per core). Use fewer on a shared "
                             "machine; results do not depend on it.")(f)


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


_DATA_CONTEXT_KEY = "robaudit.data_loading"
DATA_LOADING_OPTIONS = ("resize", "center_crop", "preprocess", "labels", "skip_bad_images", "workers")


def data_loading_options(f):
    """--resize/--center-crop/--preprocess/--labels/--skip-bad-images/--workers (scan).

    The command does not take them as parameters: they are stashed in the click context
    and `data_loading_kwargs` turns them into load_dataset's keyword arguments.
    """
    from robaudit.audit.data.preprocessing import PRESETS

    options = [
        click.option("--resize", type=int, default=None,
                     help="Resize every image's shorter side to N pixels (bilinear, antialiased), "
                          "before the attacks, so --eps applies to the resized pixels."),
        click.option("--center-crop", type=int, default=None,
                     help="Then keep the central MxM pixels (lets images of different sizes share one)."),
        click.option("--preprocess", type=click.Choice(sorted(PRESETS)), default=None,
                     help="A named preprocessing: robustbench-imagenet = --resize 256 --center-crop 224 "
                          "(RobustBench's ImageNet convention)."),
        click.option("--labels", type=click.Path(), default=None,
                     help="Labels of a flat image folder: ImageNet's LOC_val_solution.csv, or a "
                          "label<TAB>file list (label: class index or name)."),
        click.option("--skip-bad-images", is_flag=True,
                     help="Image folders: decode every selected image up front and leave out the "
                          "unreadable ones (counted in results.json dataset.subset)."),
        click.option("--workers", type=int, default=None,
                     help="Image folders: processes decoding images ahead of the model "
                          "[min(4, CPU count); 0: decode in the main process]."),
    ]

    return _stashing_options(f, options, DATA_LOADING_OPTIONS, _DATA_CONTEXT_KEY)


def data_loading_kwargs(dataset, data_dir) -> dict:
    """load_dataset keyword arguments from the stashed data-loading options.

    For an image folder, --class-names is taken from the model options and handed to the
    dataset instead (it may be ImageNet's LOC_synset_mapping.txt, which only the folder's
    synset ids can be matched against); the names then reach EvalData.classes directly.
    """
    from robaudit.audit.data.datasets import image_folder_path

    ctx = click.get_current_context(silent=True)
    kwargs = dict(ctx.meta.get(_DATA_CONTEXT_KEY, {})) if ctx is not None else {}
    kwargs["skip_bad_images"] = bool(kwargs.get("skip_bad_images"))
    if image_folder_path(dataset, data_dir) is not None and ctx is not None:
        boundary = ctx.meta.get(_CONTEXT_KEY, {})
        kwargs["class_names"] = boundary.pop("class_names", None)
    return kwargs


def load_model_from_options(model_path, *, model_format, arch, num_classes, trust_pickle, mean, std,
                            device, dataset_classes, input_shape, input_layout=None, input_range=None,
                            output=None, output_name=None, class_names=None, class_map=None,
                            probe_data=None, dataset_name=None, zoo_dir=None):
    """workflows.load_model_with_options with the boundary options (--input-layout ... --class-map)
    and --zoo-dir defaulting to the values the command line gave (see model_options)."""
    from robaudit.workflows import load_model_with_options

    given = {"input_layout": input_layout, "input_range": input_range, "output": output,
             "output_name": output_name, "class_names": class_names, "class_map": class_map}
    ctx = click.get_current_context(silent=True)
    stashed = ctx.meta.get(_CONTEXT_KEY, {}) if ctx is not None else {}
    boundary = {name: (value if value is not None else stashed.get(name)) for name, value in given.items()}
    return load_model_with_options(
        model_path, model_format=model_format, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle,
        mean=mean, std=std, device=device, dataset_classes=dataset_classes, input_shape=input_shape,
        probe_data=probe_data, dataset_name=dataset_name,
        zoo_dir=zoo_dir if zoo_dir is not None else stashed.get("zoo_dir"), **boundary)


def check_subset_args(limit, n_per_class):
    for flag, value in (("--limit", limit), ("--n-per-class", n_per_class)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1")




_SIGN_KEY = "robaudit.sign_key"


def _check_sign_key(ctx, param, value):
    """--sign: the key is checked as the option is read, before anything is loaded or written."""
    if value is not None:
        from robaudit.signing import load_signing_key

        ctx.meta[_SIGN_KEY] = load_signing_key(value)
    return value


def sign_option(f):
    """--sign KEYFILE: SSHSIG signatures beside the written files (robaudit/signing.py)."""
    return click.option("--sign", "sign_key", metavar="KEYFILE", type=click.Path(), default=None,
                        expose_value=False, is_eager=True, callback=_check_sign_key,
                        help="Sign each written results.json, report and evidence file with this OpenSSH "
                             "ed25519 private key: FILE.sig beside FILE, checked with `ssh-keygen -Y "
                             "verify -n robaudit` (docs/signing.md).")(f)


def signing_key():
    """The SigningKey --sign gave (checked), or None."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(_SIGN_KEY) if ctx is not None else None
