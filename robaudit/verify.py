"""`robaudit verify`: re-check an audit's claimed failures without any attack code.

Load the model and the data (the same options as `scan`, defaulting to what results.json
recorded), read the evidence file (audit/evidence.py), then forward and compare. Every
check is a small function `check_*(ctx) -> Line` (one output line, ok or not), listed in
`AUDIT_CHECKS` (whole audit) and run per attack by `check_attack`; more checks (the page
tamper check, signatures) are appended to `AUDIT_CHECKS` or passed to `run_checks`.

Exit codes (robaudit/cli.py): 0 every line verified, 3 something differs, 2 bad input
(unreadable files, an evidence file for another model or other data) -- one line, and
nothing is written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from robaudit.audit import evidence as evidence_mod
from robaudit.audit import replay as replay_mod
from robaudit.audit.integrity import file_digest, results_digest
from robaudit.errors import UserError

EXIT_DIFFERS = 3
_EMBEDDED = re.compile(r'<script type="application/json" id="results-data">(.*?)</script>', re.S)


@dataclass
class Line:
    ok: bool
    text: str


@dataclass
class VerifyContext:
    results: dict
    results_path: Path
    results_sha256: Optional[str]  # of the file's bytes (results.json) or of the embedded results (page);
    #                                None: a page that embeds trimmed curves
    from_page: bool
    evidence: Optional[evidence_mod.Evidence]
    module: Optional[torch.nn.Module] = None   # the artifact's runtime (replay.artifact_module)
    runtime: str = ""
    data: object = None
    batch_size: int = 256
    device: object = "cpu"
    extra: Dict[str, object] = field(default_factory=dict)  # room for later checks (signatures)


# --------------------------------------------------------------------------- inputs

def read_results(path) -> tuple:
    """(results, sha256, from_page): a results.json, or the results embedded in a report.html."""
    from robaudit.audit.results_schema import validate_results

    path = Path(path)
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"results file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    from_page = text.lstrip()[:15].lower().startswith(("<!doctype", "<html"))
    if from_page:
        found = _EMBEDDED.search(text)
        if found is None:
            raise UserError(f"{path} holds no embedded results (<script id=\"results-data\">); "
                            "is it a robaudit report?")
        text = found.group(1)
    try:
        results = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON (line {err.lineno}: {err.msg})") from None
    validate_results(results, source=str(path))
    trimmed = from_page and any(isinstance(block, dict) and "omitted_in_report" in block
                                for block in (results.get("curves") or {}).values())
    # a page whose curve bounds were left out (too large) embeds no digest-comparable results
    digest = None if trimmed else (results_digest(results) if from_page else file_digest(path))
    return results, digest, from_page


def recorded_options(results: dict) -> dict:
    """The scan's subset and boundary adaptations, as load_dataset / load_model_from_options
    keyword arguments (the defaults of `verify`)."""
    subset = results["dataset"].get("subset") or {}
    adapt = results["model"].get("adaptations") or {}
    options = {"split": results["dataset"].get("split", "test"), "limit": subset.get("limit"),
               "n_per_class": subset.get("n_per_class")}
    layout = (adapt.get("input_layout") or {}).get("layout")
    options["input_layout"] = layout
    options["input_range"] = (adapt.get("input_range") or {}).get("range")
    output = adapt.get("output") or {}
    options["output"] = output.get("kind")
    options["output_name"] = output.get("name")
    normalize = adapt.get("normalize")
    if normalize and "source" not in normalize:  # given with --mean/--std (else the file says it)
        options["mean"] = ",".join(repr(float(v)) for v in normalize["mean"])
        options["std"] = ",".join(repr(float(v)) for v in normalize["std"])
    class_map = adapt.get("class_map")
    options["class_map"] = class_map["model_to_dataset"] if class_map else None
    class_names = adapt.get("class_names")
    options["class_names"] = class_names["names"] if class_names else None
    model = results["model"]
    arch = model.get("arch")
    given_arch = (model.get("format") in ("state_dict", "checkpoint", "safetensors")
                  and not model.get("arch_inferred") and arch and not str(arch).startswith("robustbench:"))
    options["arch"] = arch if given_arch else None   # a weights file audited with --arch
    return options


def check_inputs(ctx: VerifyContext, model_sha256: str, data_sha256: str) -> None:
    """Bad input (exit 2): the evidence was made for another model or other data."""
    manifest = ctx.evidence.manifest
    if model_sha256 != manifest["model_sha256"]:
        raise UserError(f"model: sha256 {model_sha256[:16]}... differs from the evidence's "
                        f"{manifest['model_sha256'][:16]}... (the evidence file is for another model)")
    if data_sha256 != manifest["data_sha256"]:
        raise UserError(f"data: sha256 {data_sha256[:16]}... of the audited images and labels differs from "
                        f"the evidence's {manifest['data_sha256'][:16]}... (other images, labels, order or "
                        "subset; pass the scan's --dataset/--limit/--n-per-class)")


# --------------------------------------------------------------------------- checks

def check_results_digest(ctx: VerifyContext) -> Line:
    expected = ctx.evidence.manifest["results_sha256"]
    what = "the page's embedded results" if ctx.from_page else ctx.results_path.name
    if ctx.results_sha256 is None:
        return Line(False, "results: the page embeds its results with the curve bounds left out (too large "
                           "for the page), so they cannot be matched to the evidence's digest: verify results.json")
    if ctx.results_sha256 == expected:
        return Line(True, f"results: verified ({what} sha256 {expected[:16]}... is the one the evidence records)")
    hint = ("edited after the scan? (a page rendered with --redact-paths embeds redacted results: "
            "verify its results.json)") if ctx.from_page else "edited after the scan?"
    return Line(False, f"results: {what} differs from the results the evidence was made with "
                       f"(sha256 {ctx.results_sha256[:16]}... != {expected[:16]}...): {hint}")


def check_model_record(ctx: VerifyContext) -> Line:
    recorded = ctx.results["model"].get("sha256")
    if recorded == ctx.evidence.manifest["model_sha256"]:
        return Line(True, f"model: verified (sha256 {recorded[:16]}...)")
    return Line(False, f"model: results name model sha256 {str(recorded)[:16]}... but the evidence "
                       f"{ctx.evidence.manifest['model_sha256'][:16]}...")


def check_config(ctx: VerifyContext) -> Line:
    digest = evidence_mod.config_digest(ctx.results["config"])
    if digest == ctx.evidence.manifest["config_sha256"]:
        return Line(True, "config: verified")
    return Line(False, "config: results.json config differs from the one the evidence was made with")


def check_attack_set(ctx: VerifyContext) -> Line:
    claimed = {a for a, b in ctx.results["attacks"].items() if b.get("replay")}
    stored = set(ctx.evidence.manifest["attacks"])
    if claimed == stored:
        return Line(True, f"attacks: verified ({', '.join(sorted(stored)) or 'none'} in both)")
    return Line(False, f"attacks: results claim replayed failures for {sorted(claimed)}, the evidence holds "
                       f"{sorted(stored)}")


def check_clean(ctx: VerifyContext) -> Line:
    """The clean per-class counts: every audited image forwarded once on the artifact."""
    from robaudit.audit.data.image_folders import stream_batches

    block = ctx.results["attacks"].get("clean")
    if block is None:
        return Line(True, "clean: not in the results (nothing to check)")
    n, y = len(ctx.data.y), ctx.data.y.numpy()
    batches = [np.arange(s, min(s + ctx.batch_size, n)) for s in range(0, n, ctx.batch_size)]
    with torch.no_grad():
        pred = np.concatenate([ctx.module(x.to(ctx.device)).float().argmax(1).cpu().numpy()
                               for x in stream_batches(ctx.data.x, batches)]) if n else np.zeros(0, np.int64)
    classes = ctx.evidence.manifest["classes"]
    correct = np.bincount(y[pred == y], minlength=len(classes))
    claimed = np.asarray([c["correct"] for c in block["per_class"]])
    wrong = np.flatnonzero(correct != claimed)[:3].tolist()
    if wrong:
        return Line(False, "clean: DIFFERS: " + "; ".join(
            f"class {classes[k]}: results.json says {int(claimed[k])} correct, the model gives {int(correct[k])}"
            for k in wrong))
    return Line(True, f"clean: verified ({int(correct.sum())} of {n} correct on {ctx.runtime}; per-class counts match)")


def check_ensemble(ctx: VerifyContext) -> Line:
    """The ensemble's per-class robust counts: a point falls when any attack's evidence holds it."""
    ensemble = ctx.results.get("ensemble")
    if not ensemble:
        return Line(True, "ensemble: not in the results (nothing to check)")
    classes = ctx.evidence.manifest["classes"]
    names = [a for a in ensemble.get("attacks", []) if a in ctx.evidence.manifest["attacks"]]
    fallen = np.unique(np.concatenate([ctx.evidence.attack(a)["position"] for a in names] or [np.zeros(0, np.int64)]))
    failures = np.bincount(ctx.data.y.numpy()[fallen], minlength=len(classes))
    if ctx.results["config"]["scoring"]["score"] == "adv-only":
        expected = np.asarray([c["n"] for c in ensemble["per_class"]]) - failures
    elif "clean" in ctx.results["attacks"]:
        expected = np.asarray([c["correct"] for c in ctx.results["attacks"]["clean"]["per_class"]]) - failures
    else:
        return Line(True, "ensemble: no clean block to count from (not checked)")
    claimed = np.asarray([c["correct"] for c in ensemble["per_class"]])
    wrong = np.flatnonzero(claimed != expected)[:3].tolist()
    if wrong:
        return Line(False, "ensemble: DIFFERS: " + "; ".join(
            f"class {classes[k]}: results.json says {int(claimed[k])} robust, the evidence supports {int(expected[k])}"
            for k in wrong))
    return Line(True, f"ensemble: verified ({len(fallen)} points fall to some attack; per-class counts match)")


def check_page(ctx: VerifyContext) -> Optional[Line]:
    """A report page re-renders from its embedded results to its exact bytes, and the digests it
    shows are those of the results it holds (audit/report/integrity.py)."""
    if not ctx.from_page:
        return None  # results.json: no page to re-render (a check that does not apply prints nothing)
    from robaudit.audit.report.integrity import inspect_page

    beside = ctx.results_path.with_name("results.json")
    results_path = beside if beside.is_file() else None
    check = inspect_page(ctx.results_path, results_path=results_path)
    used = f"; digest checked against {beside.name} beside it" if results_path else ""
    notes = f" (note: {'; '.join(check.notes)})" if check.notes else ""
    if check.problems:
        return Line(False, "page: DIFFERS: " + "; ".join(check.problems))
    return Line(True, f"page: verified (re-rendered from its embedded results to the same bytes; "
                      f"results digest {check.results_digest}{used}){notes}")


def _signed_files(ctx: VerifyContext) -> List[Path]:
    files = [ctx.results_path]
    if ctx.extra.get("evidence_path") is not None:
        files.append(Path(ctx.extra["evidence_path"]))
    return files


def check_signatures(ctx: VerifyContext) -> Optional[Line]:
    """Each given file's `<file>.sig` (OpenSSH SSHSIG, robaudit/signing.py): made by which key,
    and, with --allowed-signers, by a listed one. Unsigned files pass unless signers are required."""
    from robaudit.signing import SIG_SUFFIX, verify_signature

    allowed = ctx.extra.get("allowed_signers")
    done, problems = [], []
    for path in _signed_files(ctx):
        sig = path.with_name(path.name + SIG_SUFFIX)
        if not sig.is_file():
            if allowed is not None:
                problems.append(f"{path.name} has no signature {sig.name} (--allowed-signers requires one)")
            continue
        check = verify_signature(path, sig, allowed_signers=allowed)
        if not check.ok:
            problems.append(f"{path.name}: {check.message}")
        else:
            who = f" for {check.principal}" if check.principal else ""
            done.append(f"{path.name} by {check.fingerprint}{who}")
    if problems:
        return Line(False, "signatures: DIFFER: " + "; ".join(problems))
    if not done:
        return None  # nothing signed, nothing required: no line
    listed = " (key in --allowed-signers)" if allowed is not None else " (no --allowed-signers: key not vetted)"
    return Line(True, "signatures: verified (" + "; ".join(done) + ")" + listed)


# Checks that need only the results file (ctx.evidence may be None): the page tamper check
# and the signature check (issue 24 item 4).
FILE_CHECKS: List[Callable[[VerifyContext], Optional[Line]]] = [check_page, check_signatures]
# Checks against the evidence file (ctx.evidence, ctx.module and ctx.data set).
AUDIT_CHECKS: List[Callable[[VerifyContext], Line]] = [
    check_results_digest, check_model_record, check_config, check_attack_set, check_clean, check_ensemble]


def _expected_correct(results: dict, name: str, failures: np.ndarray) -> Optional[np.ndarray]:
    """Per-class robust counts the evidence supports: clean-correct (or n, adv-only) minus failures."""
    if results["config"]["scoring"]["score"] == "adv-only":
        base = [c["n"] for c in results["attacks"][name]["per_class"]]
    elif "clean" in results["attacks"]:
        base = [c["correct"] for c in results["attacks"]["clean"]["per_class"]]
    else:
        return None
    return np.asarray(base, dtype=np.int64) - failures


def check_attack(ctx: VerifyContext, name: str) -> Line:
    """Every stored failure: in the ball and [0, 1], re-fools the artifact; counts match results."""
    part = ctx.evidence.attack(name)
    manifest, data = ctx.evidence.manifest, ctx.data
    classes = manifest["classes"]
    pos = torch.from_numpy(part["position"])
    if len(pos) and (pos.min() < 0 or pos.max() >= len(data.y)):
        return Line(False, f"{name}: evidence positions outside the audited data")
    problems = []
    if not (np.array_equal(part["label"], data.y.numpy()[part["position"]])
            and np.array_equal(part["index"], data.index.numpy()[part["position"]])):
        problems.append("dataset indices or labels differ from the audited data")
    clean = data.x[pos] if len(pos) else torch.zeros((0, *manifest["image_shape"]))
    clean = clean if isinstance(clean, torch.Tensor) else torch.as_tensor(np.asarray(clean))
    images = ctx.evidence.images(name, clean.float())
    outside = ~replay_mod.in_ball(clean, images, float(manifest["eps"]), manifest["norm"])
    if outside.any():
        problems.append(f"{int(outside.sum())} images outside the eps-ball or [0, 1] "
                        f"(positions {part['position'][outside.numpy()][:5].tolist()})")
    pred = replay_mod.predict(ctx.module, images.to(ctx.device), ctx.batch_size).cpu().numpy()
    missed = pred == part["label"]
    if missed.any():
        problems.append(f"{int(missed.sum())} stored images no longer fool the model "
                        f"(positions {part['position'][missed][:5].tolist()})")
    on_grid = (torch.round(images * 255) / 255 == images).flatten(1).all(dim=1).numpy()
    counts = np.bincount(part["label"], minlength=len(classes))
    realizable = np.bincount(part["label"][on_grid], minlength=len(classes))
    block = ctx.results["attacks"].get(name) or {}
    claimed = block.get("replay") or {}
    if claimed.get("confirmed") != counts.tolist():
        problems.append(f"replay.confirmed {claimed.get('confirmed')} != the evidence's {counts.tolist()}")
    if claimed.get("realizable") != realizable.tolist():
        problems.append(f"replay.realizable {claimed.get('realizable')} != the evidence's {realizable.tolist()}")
    expected = _expected_correct(ctx.results, name, counts)
    if expected is not None and block.get("per_class"):
        correct = np.asarray([c["correct"] for c in block["per_class"]])
        for k in np.flatnonzero(correct != expected)[:3].tolist():
            problems.append(f"class {classes[k]}: results.json says {int(correct[k])} robust, "
                            f"the evidence supports {int(expected[k])}")
    if problems:
        return Line(False, f"{name}: DIFFERS: " + "; ".join(problems))
    return Line(True, f"{name}: verified ({len(pos)} failures re-fool the model on {ctx.runtime}, "
                      f"{int(on_grid.sum())} of them 8-bit; per-class counts match)")


def run_checks(ctx: VerifyContext, extra: Sequence[Callable[[VerifyContext], Line]] = ()) -> List[Line]:
    """FILE_CHECKS and `extra`, then (with evidence) AUDIT_CHECKS and one line per attack."""
    lines = [line for line in (check(ctx) for check in (*FILE_CHECKS, *extra)) if line is not None]
    if ctx.evidence is not None:
        lines += [check(ctx) for check in AUDIT_CHECKS]
        lines += [check_attack(ctx, name) for name in ctx.evidence.manifest["attacks"]]
    return lines


class VerifyFailed(UserError):
    """Something the results claim is not what the evidence and the model support (exit 3)."""

    exit_code = EXIT_DIFFERS


def verify(results_path, evidence_path, *, load_data: Callable[[dict], object],
           load_model: Callable[[object, dict], object], device, batch_size: int = 256,
           extra_checks: Sequence[Callable[[VerifyContext], Line]] = (), echo=print,
           extra: Optional[dict] = None) -> List[Line]:
    """Run every check and echo one line each; raise VerifyFailed when any differs.

    load_data(recorded options) -> EvalData and load_model(data, recorded options) ->
    LoadedModel take the command line's options, falling back to the recorded ones. `extra`
    (e.g. {"allowed_signers": path}) reaches the checks as ctx.extra.
    Everything that can be bad input is read and checked before the first forward pass.
    """
    results, digest, from_page = read_results(results_path)
    if evidence_path is None:  # only the checks on the file itself
        signed = Path(str(results_path) + ".sig").is_file()
        required = (extra or {}).get("allowed_signers") is not None   # then a missing .sig is a finding
        if not (from_page or signed or required or extra_checks):  # a bare results.json says nothing about itself
            raise UserError("nothing to verify: pass --evidence evidence.npz with --model and --dataset "
                            "(or a report.html, or a results.json signed with --sign)")
        ctx = VerifyContext(results=results, results_path=Path(results_path), results_sha256=digest,
                            from_page=from_page, evidence=None, extra=dict(extra or {}))
        return _report(run_checks(ctx, extra_checks), echo)
    evidence = evidence_mod.read(evidence_path)
    recorded = recorded_options(results)
    data = load_data(recorded)
    if list(data.x.shape[1:]) != list(evidence.manifest["image_shape"]):
        raise UserError(f"data: images are {list(data.x.shape[1:])}, the evidence's "
                        f"{evidence.manifest['image_shape']}")
    ctx = VerifyContext(results=results, results_path=Path(results_path), results_sha256=digest,
                        from_page=from_page, evidence=evidence, data=data, batch_size=batch_size,
                        device=device, extra=dict(extra or {}))
    model = load_model(data, recorded)
    check_inputs(ctx, model.sha256, evidence_mod.data_digest(data.x, data.y, max(batch_size, 1)))
    ctx.module, ctx.runtime = replay_mod.artifact_module(model, device)
    return _report(run_checks(ctx, extra_checks), echo)


def _report(lines: List[Line], echo) -> List[Line]:
    """Echo every line; raise VerifyFailed when any differs."""
    for line in lines:
        echo(line.text)
    failed = [line for line in lines if not line.ok]
    if failed:
        raise VerifyFailed(f"verification failed: {len(failed)} of {len(lines)} checks differ "
                           f"(first: {failed[0].text.split(':', 1)[0]})")
    return lines


def _given(name: str) -> bool:
    """Whether the command line gave option `name` (not its default)."""
    import click
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    source = ctx.get_parameter_source(name) if ctx is not None else None
    return source is not None and source != ParameterSource.DEFAULT


def run_verify_command(results_path, evidence_path, model_path, *, split, batch_size, device, options: dict,
                       echo, extra_checks: Sequence[Callable[[VerifyContext], Line]] = (),
                       extra: Optional[dict] = None) -> None:
    """The `robaudit verify` command: the scan's model/data options, defaults from the results."""
    from robaudit.audit.data.datasets import load_dataset
    from robaudit.audit.devices import resolve_device
    from robaudit.cli_options import check_subset_args, data_loading_kwargs, load_model_from_options

    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if evidence_path is not None and (model_path is None or options.get("dataset") is None):
        raise UserError("--evidence needs --model and --dataset (your copies of the audited model and data)")
    if evidence_path is None and (model_path is not None or options.get("dataset") is not None):
        raise UserError("--model and --dataset are read with --evidence only; pass the evidence.npz too")
    check_subset_args(options.get("limit"), options.get("n_per_class"))
    torch_device = resolve_device(device)

    def pick(name, recorded):
        return options.get(name) if _given(name) or recorded.get(name) is None else recorded[name]

    def load_data(recorded):
        dataset, data_dir = options["dataset"], options.get("data_dir")
        return load_dataset(dataset, split=split or recorded["split"], data_dir=data_dir,
                            limit=pick("limit", recorded), n_per_class=pick("n_per_class", recorded),
                            **data_loading_kwargs(dataset, data_dir))

    def load_model(data, recorded):
        boundary = {name: pick(name, recorded) for name in
                    ("input_layout", "input_range", "output", "output_name", "class_map", "class_names",
                     "mean", "std")}
        return load_model_from_options(
            model_path, model_format=options.get("model_format", "auto"), arch=pick("arch", recorded),
            num_classes=options.get("num_classes"), trust_pickle=options.get("trust_pickle", False),
            device=torch_device, dataset_classes=data.classes, input_shape=tuple(data.x.shape[1:]),
            dataset_name=data.name, zoo_dir=options.get("zoo_dir"), **boundary)

    extra = {**(extra or {}), "evidence_path": evidence_path}
    verify(results_path, evidence_path, load_data=load_data, load_model=load_model, device=torch_device,
           batch_size=batch_size, echo=echo, extra_checks=extra_checks, extra=extra)
