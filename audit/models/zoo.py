"""Models named by a zoo rather than a file: `robustbench:[THREAT/]NAME` and timm architectures.

`load_model` asks `model_source(path, arch=..., format=..., dataset=..., zoo_dir=...)`
whether its MODEL is one of these; None means an ordinary file. A `ZooSource` says which
file is read (its path and sha256 are the ones recorded), checks the flags against the
zoo before anything is fetched (`prepare`, which also downloads into the cache), may bring
its own reader, adds what the zoo knows to what the reader found (`finish`) and carries
the record load_model stores as results.json `model.adaptations.zoo`.

RobustBench (`robustbench:Carmon2019Unlabeled`, `robustbench:L2/NAME`; threat models Linf
(default), L2, corruptions; the dataset is --dataset's name: cifar10, cifar100 or imagenet).
The cache mirrors RobustBench's own layout, `{model_dir}/{dataset}/{threat}/{NAME}.pt`, with
model_dir from --zoo-dir, else $ROBAUDIT_ZOO_DIR, else ~/.cache/robaudit/robustbench:

* robustbench importable: its zoo builds the architecture (`robustbench.utils.load_model`),
  after robaudit has downloaded a missing checkpoint with RobustBench's own downloader into
  the cache (atomically; offline, one line names the exact path to put the file at and
  where RobustBench publishes it). Its torch.load is robaudit's (`formats.torch_load`:
  weights_only unless --trust-pickle).
* not importable, the file in the cache: read as weights through the ordinary path
  (`formats.model_from_weights`: 'state_dict' key, 'module.' prefix, mu/sigma buffers ->
  boundary normalisation, architecture inferred or --arch), recorded as such.
* neither: one line naming the path and `pip install 'robaudit[robustbench]'`.

timm: `--arch timm:NAME` loads a weights file (safetensors, state_dict, checkpoint) into
`timm.create_model(NAME, pretrained=False, num_classes=...)` with an exact key and shape
check (`timm_from_weights`, called by `formats.model_from_weights`); a Hugging Face folder
(`model.safetensors` + `config.json` with "architecture" and "pretrained_cfg") passed as
MODEL also gives the architecture, and its pretrained_cfg mean/std become the boundary
normalisation (--mean/--std must agree) and its input_size must be the dataset's.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
import warnings
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from robaudit.audit.models import formats
from robaudit.audit.models.timm_build import (TIMM_PREFIX, check_timm_arch, import_timm,  # noqa: F401
                                              is_timm_arch, timm_from_weights)  # (re-exported)
from robaudit.audit.models.adapters import BoundaryRequest, ModelInfo, first_line
from robaudit.errors import UserError

log = logging.getLogger(__name__)

ROBUSTBENCH_PREFIX = "robustbench:"
THREAT_MODELS = ("Linf", "L2", "corruptions")
ZOO_DATASETS = ("cifar10", "cifar100", "imagenet")
ZOO_DIR_ENV = "ROBAUDIT_ZOO_DIR"
DEFAULT_ZOO_DIR = os.path.join("~", ".cache", "robaudit", "robustbench")
ROBUSTBENCH_HOME = "https://github.com/RobustBench/robustbench"
ROBUSTBENCH_INSTALL = "pip install 'robaudit[robustbench]'"
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# pretrained_cfg entries copied into the record (the rest is timm bookkeeping).
PRETRAINED_CFG_KEYS = ("tag", "input_size", "mean", "std", "interpolation", "crop_pct", "num_classes")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+\-]*$")


class ZooSource:
    """A MODEL that names a zoo entry (see the module docstring); load_model drives it."""

    def __init__(self, path: str, arch: Optional[str], record: Dict[str, Any],
                 reader: Optional[formats.ModelFormat] = None):
        self.path = path        # the file read and hashed (known before prepare; may not exist yet)
        self.arch = arch        # the architecture for the weights path (None: the reader's or inferred)
        self.record = record    # -> results.json model.adaptations.zoo
        self.reader = reader    # None: the file's format, as for any file

    def prepare(self, request: BoundaryRequest) -> str:
        """Check the boundary flags against the zoo, fetch the file; its path."""
        return self.path

    def finish(self, info: ModelInfo) -> None:
        """Add what the zoo knows to what the reader found."""


def model_source(path: str, *, arch: Optional[str] = None, format: str = "auto", dataset: Optional[str] = None,
                 zoo_dir: Optional[str] = None) -> Optional[ZooSource]:
    """The ZooSource for `path` (a robustbench spec, a timm folder or --arch timm:NAME), or None."""
    if is_robustbench_spec(path):
        return robustbench_source(path, arch=arch, format=format, dataset=dataset, zoo_dir=zoo_dir)
    if zoo_dir is not None:
        raise UserError(f"--zoo-dir is only used with robustbench:NAME models, not with {path}")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, HF_CONFIG)):
        return TimmFolderSource.from_folder(path, arch)
    if arch is not None and is_timm_arch(arch):
        return TimmFileSource(path, check_timm_arch(arch))
    return None


# --- RobustBench -----------------------------------------------------------------------------

def is_robustbench_spec(text: Any) -> bool:
    return isinstance(text, str) and text.lower().startswith(ROBUSTBENCH_PREFIX)


def parse_robustbench_spec(spec: str) -> Tuple[str, str]:
    """(threat model, NAME) of `robustbench:[THREAT/]NAME`; UserError when malformed."""
    rest = spec[len(ROBUSTBENCH_PREFIX):].strip()
    threat, name = rest.split("/", 1) if "/" in rest else ("Linf", rest)
    by_lower = {t.lower(): t for t in THREAT_MODELS}
    if threat.strip().lower() not in by_lower:
        raise UserError(f"unknown RobustBench threat model {threat!r} in {spec!r}; use robustbench:NAME "
                        f"(Linf) or robustbench:THREAT/NAME with THREAT one of {', '.join(THREAT_MODELS)}")
    name = name.strip()
    if not _NAME.match(name):
        raise UserError(f"malformed RobustBench model name {name!r} in {spec!r}; give the zoo's name, "
                        f"e.g. robustbench:Carmon2019Unlabeled")
    return by_lower[threat.strip().lower()], name


def resolve_zoo_dir(zoo_dir: Optional[str] = None) -> Tuple[str, str]:
    """(model_dir, where it came from: "--zoo-dir", "$ROBAUDIT_ZOO_DIR" or "default")."""
    if zoo_dir:
        return os.path.abspath(os.path.expanduser(os.fspath(zoo_dir))), "--zoo-dir"
    env = os.environ.get(ZOO_DIR_ENV)
    if env:
        return os.path.abspath(os.path.expanduser(env)), f"${ZOO_DIR_ENV}"
    return os.path.abspath(os.path.expanduser(DEFAULT_ZOO_DIR)), "default"


def cache_path(model_dir: str, dataset: str, threat: str, name: str) -> str:
    """RobustBench's own layout: {model_dir}/{dataset}/{threat}/{NAME}.pt."""
    return os.path.join(model_dir, dataset, threat, f"{name}.pt")


def import_robustbench():
    """robustbench.utils, or None when robustbench is not installed (tests replace this).

    robustbench imports `autoattack`, which is only published as source (PyPI has the same
    authors' attacks as `pyautoattack`, a robaudit dependency): when it is missing, that
    name is served by pyautoattack. robaudit uses only robustbench's model zoo.
    """
    if importlib.util.find_spec("robustbench") is None:
        return None
    if importlib.util.find_spec("autoattack") is None:
        import pyautoattack
        import pyautoattack.state

        sys.modules.setdefault("autoattack", pyautoattack)
        sys.modules.setdefault("autoattack.state", pyautoattack.state)
    try:  # its import warns about its own dependencies (pkg_resources, timm paths): not the user's business
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module("robustbench.utils")
    except ImportError as err:
        hint = " (robustbench needs pkg_resources: pip install 'setuptools<81')" if "pkg_resources" in str(err) else ""
        raise UserError(f"robustbench is installed but cannot be imported: {first_line(err)}{hint}") from None


def robustbench_source(spec: str, *, arch: Optional[str], format: str, dataset: Optional[str],
                       zoo_dir: Optional[str]) -> ZooSource:
    """The source of `robustbench:[THREAT/]NAME` for --dataset `dataset` (see the module docstring)."""
    if os.path.exists(spec):
        raise UserError(f"{spec!r} is both a RobustBench model name and a file here; pass ./{spec} for the file")
    threat, name = parse_robustbench_spec(spec)
    dataset_name = str(dataset or "").lower()
    if dataset_name not in ZOO_DATASETS:
        raise UserError(f"{spec}: RobustBench models are for the datasets {', '.join(ZOO_DATASETS)}, and "
                        f"the dataset is --dataset's name; got {dataset!r}")
    if arch is not None and is_timm_arch(arch):
        raise UserError(f"--arch {arch}: {spec} is a RobustBench checkpoint, not timm weights; drop --arch")
    model_dir, model_dir_from = resolve_zoo_dir(zoo_dir)
    path = cache_path(model_dir, dataset_name, threat, name)
    record = {"zoo": "robustbench", "model": name, "threat_model": threat, "dataset": dataset_name,
              "model_dir": model_dir, "model_dir_from": model_dir_from, "cache_path": path,
              "built_by": None, "downloaded": False, "robustbench_version": None}
    utils = import_robustbench()
    if utils is not None:
        return RobustBenchZooSource(path, record, utils, arch=arch, format=format)
    if not os.path.isfile(path):
        raise UserError(f"{spec}: no checkpoint at {path} and robustbench is not installed; put RobustBench's "
                        f"{name}.pt there (RobustBench lists where each model's file is published: "
                        f"{ROBUSTBENCH_HOME}), or {ROBUSTBENCH_INSTALL} to download it")
    return CachedRobustBenchSource(path, None, record)  # --arch, if any, is resolved as for any file


class CachedRobustBenchSource(ZooSource):
    """robustbench not installed, the checkpoint in the cache: the ordinary weights path."""

    def prepare(self, request: BoundaryRequest) -> str:
        self._mean_given = request.mean is not None
        return self.path

    def finish(self, info: ModelInfo) -> None:
        name = self.record["model"]
        if info.arch_inferred is not None:
            how = (f"robaudit: architecture {info.arch} inferred from the checkpoint's keys and shapes "
                   f"(robustbench not installed), not taken from RobustBench's zoo")
        elif info.arch is not None:
            how = f"robaudit: --arch {info.arch} (robustbench not installed), not taken from RobustBench's zoo"
        else:
            how = "robaudit: the cached file holds a whole model (robustbench not installed)"
        self.record.update(built_by=how, architecture=info.arch)
        if info.arch is not None and info.input_normalization is None and not self._mean_given:
            info.notes.append(f"robustbench:{name} read as plain weights: an input normalisation that "
                              f"RobustBench's code applies without storing it in the checkpoint is unknown "
                              f"to robaudit; check the clean accuracy, or {ROBUSTBENCH_INSTALL} to build "
                              f"{name} as the zoo does")


def _zoo_entry(utils, name: str, dataset: str, threat: str) -> Dict[str, Any]:
    """RobustBench's entry for NAME, refused (one line) where it has no single zoo checkpoint."""
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    lower = name.lower().replace("-", "_")
    timm_name = f"{lower}_{dataset}_{threat.lower()}"
    if utils.timm.is_model(timm_name):
        raise UserError(f"robustbench:{name} is published on the Hugging Face hub through timm "
                        f"({timm_name}), not as a zoo checkpoint robaudit can cache and hash; not supported")
    entries = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat)]
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=3)
        raise UserError(f"RobustBench has no {dataset} {threat} model {name!r}"
                        + (f"; did you mean {', '.join(close)}?" if close else f"; see {ROBUSTBENCH_HOME}"))
    entry = entries[name]
    gdrive = entry.get("gdrive_id")
    if gdrive is None or (dataset == "imagenet" and "Standard" in name):
        raise UserError(f"robustbench:{name} has no RobustBench checkpoint (its weights come from elsewhere); "
                        f"not supported")
    if isinstance(gdrive, (list, tuple)):
        raise UserError(f"robustbench:{name} is an ensemble of {len(gdrive)} checkpoints; robaudit audits "
                        f"single-checkpoint zoo entries only")
    return entry


class _TorchWithRobauditLoad:
    """robustbench.utils' `torch`, except that torch.load is formats.torch_load
    (weights_only unless --trust-pickle; one-line errors), noting what the file held."""

    def __init__(self, trust_pickle: bool):
        self.trust_pickle, self.held = trust_pickle, None

    def load(self, f, map_location=None, **_):
        obj = formats.torch_load(os.fspath(f), self.trust_pickle)
        is_weights = isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values())
        self.held = "state_dict" if is_weights else "checkpoint"
        return obj

    def __getattr__(self, name: str):
        return getattr(torch, name)


class RobustBenchZooSource(ZooSource):
    """robustbench importable: its zoo builds NAME; a missing checkpoint is downloaded first."""

    def __init__(self, path: str, record: Dict[str, Any], utils, *, arch: Optional[str], format: str):
        super().__init__(path, None, record, reader=self)
        self.utils = utils
        spec = f"robustbench:{record['threat_model']}/{record['model']}"
        if arch is not None:
            raise UserError(f"--arch {arch}: robustbench builds {spec}'s own architecture; drop --arch")
        if format != "auto":
            raise UserError(f"--format {format}: {spec} is read by robustbench; drop --format")
        self.entry = _zoo_entry(utils, record["model"], record["dataset"], record["threat_model"])
        record["robustbench_version"] = _version("robustbench")
        record["published_at"] = f"https://drive.google.com/uc?id={self.entry['gdrive_id']}"

    def prepare(self, request: BoundaryRequest) -> str:
        if request.mean is not None:
            raise UserError(f"--mean/--std: RobustBench models take [0, 1] images and normalise them "
                            f"themselves (robustbench:{self.record['model']}); drop --mean/--std")
        if not os.path.isfile(self.path):
            self._download()
        return self.path

    def _download(self) -> None:
        name, where = self.record["model"], self.record["published_at"]
        offline = (f"put the checkpoint at {self.path} (RobustBench publishes it at {where}) and run again")
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the zoo cache {os.path.dirname(self.path)}: "
                            f"{err.strerror or err}; pass --zoo-dir DIR") from None
        partial = f"{self.path}.{os.getpid()}.part"
        # A download can take minutes: say so even without -v.
        log.warning("downloading robustbench:%s into %s ...", name, self.path)
        try:
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # it prints the .part name
                self.utils.download_gdrive_new(self.entry["gdrive_id"], partial)
            if not os.path.isfile(partial) or os.path.getsize(partial) == 0:
                raise OSError("nothing was downloaded")
        except Exception as err:  # offline, quota, ...: whatever the downloader raised
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise UserError(f"could not download robustbench:{name} ({first_line(err)}); {offline}") from None
        os.replace(partial, self.path)
        self.record["downloaded"] = True

    def read(self, path: str, options: formats.ReadOptions) -> Tuple[nn.Module, ModelInfo]:
        record, patched = self.record, _TorchWithRobauditLoad(options.trust_pickle)
        saved = self.utils.torch
        self.utils.torch = patched
        try:
            with contextlib.redirect_stdout(sys.stderr):
                module = self.utils.load_model(model_name=record["model"], model_dir=record["model_dir"],
                                               dataset=record["dataset"], threat_model=record["threat_model"])
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"robustbench could not load robustbench:{record['model']} from {path}: "
                            f"{first_line(err)} (a partial or wrong file? delete it to download it again)") from None
        finally:
            self.utils.torch = saved
        record["built_by"] = "robustbench.utils.load_model (RobustBench's architecture and loading code)"
        note = (f"robustbench:{record['threat_model']}/{record['model']} built by robustbench "
                f"{record['robustbench_version']} from {path}; it takes [0, 1] images (any normalisation is "
                f"RobustBench's, inside the model)")
        return module, ModelInfo(format=patched.held or "checkpoint", arch=f"robustbench:{record['model']}",
                                 notes=[note])


def _version(package: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# --- timm --------------------------------------------------------------------------------------

class TimmFileSource(ZooSource):
    """--arch timm:NAME with a weights file: no pretrained_cfg, so no normalisation is assumed."""

    def __init__(self, path: str, arch: str):
        record = {"zoo": "timm", "model": arch[len(TIMM_PREFIX):], "weights": path, "config": None,
                  "pretrained_cfg": None, "built_by": "timm.create_model(pretrained=False) with the file's weights",
                  "timm_version": import_timm().__version__}
        super().__init__(path, arch, record)

    def prepare(self, request: BoundaryRequest) -> str:
        self._mean_given = request.mean is not None
        return self.path

    def finish(self, info: ModelInfo) -> None:
        _check_weights_read(info, self.arch, self.path)
        beside = os.path.join(os.path.dirname(os.path.abspath(self.path)), HF_CONFIG)
        if not self._mean_given:
            info.notes.append(f"no input normalisation: {self.path} comes without a timm config (timm's "
                              f"default pretrained_cfg belongs to its hub weights); pass --mean/--std if "
                              f"the model expects them"
                              + (f", or pass the folder {os.path.dirname(beside)} to use its {HF_CONFIG}"
                                 if os.path.isfile(beside) else ""))


def _check_weights_read(info: ModelInfo, arch: str, path: str) -> None:
    if info.arch != arch:  # the file held a whole model, which --arch does not apply to
        raise UserError(f"{path} holds a whole model ({info.format}), not weights for {arch}; drop --arch")


class TimmFolderSource(ZooSource):
    """A Hugging Face folder of a timm model: config.json + model.safetensors (or pytorch_model.bin)."""

    def __init__(self, path: str, arch: str, record: Dict[str, Any], cfg: Dict[str, Any], config_path: str):
        super().__init__(path, arch, record)
        self.cfg, self.config_path = cfg, config_path

    @classmethod
    def from_folder(cls, folder: str, arch: Optional[str]) -> "TimmFolderSource":
        config_path, config, cfg = read_timm_config(folder)
        found = check_timm_arch(TIMM_PREFIX + config["architecture"])
        if arch is not None and (not is_timm_arch(arch) or check_timm_arch(arch) != found):
            raise UserError(f"--arch {arch} disagrees with {config_path}, which says {found}; drop --arch")
        weights = next((os.path.join(folder, f) for f in HF_WEIGHTS if os.path.isfile(os.path.join(folder, f))),
                       None)
        if weights is None:
            raise UserError(f"{folder} has {HF_CONFIG} but no weights ({' or '.join(HF_WEIGHTS)})")
        record = {"zoo": "timm", "model": found[len(TIMM_PREFIX):], "folder": os.path.abspath(folder),
                  "weights": weights, "config": config_path,
                  "pretrained_cfg": {k: cfg[k] for k in PRETRAINED_CFG_KEYS if k in cfg},
                  "built_by": "timm.create_model(pretrained=False) with the folder's weights",
                  "timm_version": import_timm().__version__}
        return cls(weights, found, record, cfg, config_path)

    def prepare(self, request: BoundaryRequest) -> str:
        size = self.cfg.get("input_size")
        if size is not None:
            if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(d, int) for d in size)):
                raise UserError(f"{self.config_path}: pretrained_cfg input_size {size!r} is not [C, H, W]")
            if tuple(size) != tuple(request.input_shape):
                raise UserError(f"{self.config_path}: pretrained_cfg input_size {list(size)} differs from the "
                                f"dataset's images {list(request.input_shape)}; audit {self.arch} on images "
                                f"of its input size")
        return self.path

    def finish(self, info: ModelInfo) -> None:
        _check_weights_read(info, self.arch, self.path)
        mean, std = self.cfg.get("mean"), self.cfg.get("std")
        if mean is None and std is None:
            info.notes.append(f"{self.config_path}'s pretrained_cfg gives no mean/std: no normalisation from it")
            return
        if not all(isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) for x in v)
                   for v in (mean, std)) or len(mean) != len(std):
            raise UserError(f"{self.config_path}: pretrained_cfg mean/std must be two lists of numbers of "
                            f"one length, got {mean!r} and {std!r}")
        info.input_normalization = {"mean": [float(v) for v in mean], "std": [float(v) for v in std],
                                    "source": f"the timm pretrained_cfg in {self.config_path}"}


def read_timm_config(folder: str) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    """(config path, config.json, its pretrained_cfg) of a timm Hugging Face folder."""
    config_path = os.path.join(folder, HF_CONFIG)
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {config_path}: {first_line(err)}") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise UserError(f"{config_path} has no \"architecture\": not a timm model folder (robaudit reads "
                        f"Hugging Face folders of timm models: model.safetensors + {HF_CONFIG})")
    cfg = config.get("pretrained_cfg") or {}
    if not isinstance(cfg, dict):
        raise UserError(f"{config_path}: \"pretrained_cfg\" must be an object")
    return config_path, config, cfg
