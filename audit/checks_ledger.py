"""The checks ledger (results.json `checks_ledger`): every check robaudit knows, with its state.

`checks` lists only the flags that fired, so "no flags" cannot tell "all passed" from "could not
run" (no black-box attack, no minimal-norm attack, ...). The ledger lists each known check once:

    {"id", "title", "state": "passed" | "failed" | "not_run", "reason", "severity",
     "scope": "audit" | "class", "class": int | null}

`reason` says what was found (failed: the flag's message), what was compared (passed), or why
it could not run (not_run: "no black-box attack in --attacks"). A class-scope check names the
worst class in `class` when it failed.

Every check is one `register_check(...)` call, an entry of CHECKS (robaudit.registry): its metadata, which
flags in results["checks"] are its own (`owns`), what it needs to run (`needs`, a not-run
reason or None) and what a pass means (`passed`). The state is read off the flags the checks
already wrote, so the ledger never disagrees with `checks`; a flag no registered check owns
still gets an entry (failed), so nothing is lost. docs/checks.md describes each check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

from robaudit.audit import class_checks
from robaudit.audit import checks as audit_checks
from robaudit.registry import Registry

CHECKS = Registry("check")
STATES = ("passed", "failed", "not_run")
SEVERITIES = ("error", "warning", "info")
SCOPES = ("audit", "class")


@dataclass(frozen=True)
class KnownCheck:
    id: str
    title: str
    severity: str
    scope: str
    owns: Callable[[str], bool]                  # is this flag id one of this check's?
    needs: Callable[[dict], Optional[str]]       # None when it can run on these results, else why not
    passed: Callable[[dict], str]                # what a pass means on these results
    worst_class: Optional[Callable[[dict], Optional[int]]] = None   # class scope: the worst failing class
    failed: Optional[Callable[[dict], Optional[str]]] = None         # a failure read off the results, no flag


def register_check(id: str, title: str, *, needs: Callable[[dict], Optional[str]], passed, severity: str = "warning",
                   scope: str = "audit", owns: Optional[Callable[[str], bool]] = None,
                   worst_class=None, failed=None) -> KnownCheck:
    """Add a check to CHECKS. `needs(results)`: None when it can run, else why not; `passed`: what
    a pass means, a string or results -> string; `owns`: which flag ids are its own (default: the
    one with its id); `worst_class` (class scope): results -> the worst failing class's index;
    `failed`: results -> why it failed, for a check whose failure is in the results, not a flag."""
    if severity not in SEVERITIES or scope not in SCOPES:
        raise ValueError(f"check {id!r}: severity {severity!r} / scope {scope!r}")
    check = KnownCheck(id, title, severity, scope, owns or (lambda flag: flag == id), needs,
                       passed if callable(passed) else (lambda results: passed), worst_class, failed)
    CHECKS.register(id)(check)
    _ORDER.append(check.id)
    return check


_ORDER: List[str] = []   # registration order: the ledger's order (CHECKS.names() is sorted)


def list_checks() -> List[KnownCheck]:
    """Every known check, in registration order (model checks, result checks, curves, per class)."""
    return [CHECKS.get(name) for name in _ORDER]


# --------------------------------------------------------------------------- what a check needs

def _attacks(results) -> dict:
    return results.get("attacks") or {}


def _requested(results) -> list:
    return list(((results.get("config") or {}).get("attacks") or {}))


def _missing(results, names) -> Optional[str]:
    """Why the first of `names` that did not run is absent: not requested, or requested and refused."""
    for name in names:
        if name in _attacks(results):
            continue
        if name in _requested(results):
            return f"{name} was requested but did not run (refused: the model has no trustworthy gradients)"
        return f"no {name} in --attacks"
    return None


def _any_missing(results, names, what: str) -> Optional[str]:
    if any(name in _attacks(results) for name in names):
        return None
    return f"no {what} ({', '.join(names)}) in --attacks, or it was refused"


def _white_box(results) -> Optional[str]:
    if (results.get("model") or {}).get("white_box", True):
        return None
    return "the model has no trustworthy gradients (model.white_box is false), so gradients were not probed"


def _always(results) -> Optional[str]:
    return None


# --------------------------------------------------------------------------- model checks (probe batch)

register_check("nondeterministic_output", "Deterministic outputs", needs=_always,
               passed="two forward passes of the probe batch agree")
register_check("probability_outputs", "Outputs are logits, not probabilities", needs=_always,
               passed="the probe batch's outputs do not look like softmax probabilities")
register_check("tied_or_zero_logits", "No flat or clipped logits", needs=_always,
               passed="few tied top logits and few exactly-zero logits on the probe batch")
register_check("zero_gradients", "Input gradients exist", needs=_white_box,
               passed="the loss has non-zero input gradients on at least 90% of the probe batch")


# --------------------------------------------------------------------------- result checks


def _near_chance_needs(results):
    if len((results.get("dataset") or {}).get("classes") or []) < 2:
        return "one class: chance is 100%"
    return _missing(results, ("clean",))


def _avg(results, name: str) -> str:
    value = _attacks(results)[name].get("avg")
    return "n/a" if value is None else f"{value:.1%}"


register_check("near_chance", "Clean accuracy above chance", needs=_near_chance_needs,
               passed=lambda r: f"clean accuracy {_avg(r, 'clean')} is above 1.5 x chance "
                                f"({1.5 / len(r['dataset']['classes']):.1%})")
register_check("pgd_weaker_than_fgsm", "Multi-step PGD at least as strong as one-step FGSM",
               needs=lambda results: _missing(results, ("pgd", "fgsm")),
               passed=lambda r: f"PGD leaves {_avg(r, 'pgd')} robust, FGSM {_avg(r, 'fgsm')} (within 2 points "
                                "or below)")
register_check("aa_much_stronger", "AutoAttack close to PGD", needs=lambda results: _missing(results, ("pgd", "aa")),
               passed=lambda r: f"AutoAttack leaves {_avg(r, 'aa')} robust, PGD {_avg(r, 'pgd')} (within 10 points)")


def _blackbox_needs(results):
    if "square" not in _attacks(results):
        if "square" in _requested(results):
            return "the black-box attack square was requested but did not run"
        return "no black-box attack (square) in --attacks"
    return None


register_check("blackbox_stronger_than_whitebox", "Black-box vs white-box",
               owns=lambda flag: flag in ("blackbox_stronger_than_pgd", "blackbox_stronger_than_aa"),
               needs=lambda results: _blackbox_needs(results) or _any_missing(results, ("pgd", "aa"),
                                                                              "white-box attack"),
               passed="the black-box Square attack does not beat PGD or AutoAttack by more than 2 points")


def _fixed_attacks(results) -> list:
    return [name for name in _attacks(results) if name != "clean"]


def _no_effect_needs(results):
    missing = _missing(results, ("clean",))
    if missing:
        return missing
    if float((results.get("config") or {}).get("eps") or 0) <= 0:
        return "eps is 0"
    if not _checked_for_effect(results):
        return "no attack ran on 20 or more clean-correct points"
    return None


def _checked_for_effect(results) -> list:
    return [name for name in _fixed_attacks(results) if _attacks(results)[name].get("n_attacked", 0) >= 20]


register_check("no_effect", "Every attack fools some points", owns=lambda flag: flag.startswith("no_effect_"),
               needs=_no_effect_needs,
               passed=lambda r: "each attack fooled some clean-correct point: " + ", ".join(_checked_for_effect(r)))
register_check("small_classes", "Classes large enough for tight intervals", severity="info", needs=_always,
               passed="every class has 30 or more samples")


def _converging(results) -> list:
    """Iterative attacks whose loss curve the convergence check reads (audit/checks.py thresholds)."""
    found = []
    for name, block in _attacks(results).items():
        diagnostics = block.get("diagnostics") or {}
        steps = len(diagnostics.get("loss_mean_unfooled") or []) - 1
        if steps >= audit_checks.LOSS_WINDOW_MIN and diagnostics.get("n_unfooled", 0) >= audit_checks.LOSS_MIN_POINTS:
            found.append(name)
    return found


register_check("loss_not_converged", "Iterative attacks converged",
               owns=lambda flag: flag.endswith("_loss_not_converged"),
               needs=lambda results: None if _converging(results) else (
                   "no iterative attack with a loss curve (pgd, cw, tpgd) left 5 or more points unfooled"),
               passed=lambda r: "the loss stopped rising before the last steps of " + ", ".join(_converging(r)))
register_check("refused_attacks", "Every requested attack ran", owns=lambda flag: flag.startswith("refused_"),
               needs=_always, passed="every attack in --attacks ran")


def _replay_needs(results):
    if not any(isinstance(block.get("replay"), dict) for block in _attacks(results).values()):
        return "no replay of the failures on the shipped artifact was recorded (attacks.<name>.replay)"
    return None


def _unconfirmed(results) -> Optional[str]:
    """attacks.<name>.replay.unconfirmed (per class) summed, when any failure was not confirmed."""
    counts = {}
    for name, block in _attacks(results).items():
        replay = block.get("replay")
        if isinstance(replay, dict):
            total = sum(int(v or 0) for v in replay.get("unconfirmed") or [])
            if total:
                counts[name] = (total, replay.get("runtime"))
    if not counts:
        return None
    return ("failures counted by the attack but not confirmed when replayed on the artifact: "
            + ", ".join(f"{name} {total} ({runtime})" if runtime else f"{name} {total}"
                        for name, (total, runtime) in counts.items()))


register_check("replay_confirmed", "Failures confirmed on the shipped artifact",
               owns=lambda flag: flag.startswith("replay_"), needs=_replay_needs, failed=_unconfirmed,
               passed="every counted failure was confirmed by replaying it on the artifact's own runtime")


# --------------------------------------------------------------------------- curve checks


def _curves_needed(results, fixed: bool = False) -> Optional[str]:
    if not results.get("curves"):
        return "no minimal-norm attack (fmn) in --attacks"
    if fixed and not [name for name in _fixed_attacks(results) if name not in results["curves"]]:
        return "no fixed-eps attack to compare the curve with"
    return None


register_check("curve_not_reaching_zero", "Minimal-norm attack fools every point", needs=_curves_needed,
               passed="the minimal-norm attack fooled all but at most 1% of the clean-correct points")
register_check("curve_below_fixed_eps", "Curves not below fixed-eps attacks",
               needs=lambda results: _curves_needed(results, fixed=True),
               passed="at the audited eps no class's curve is 5 or more points below a fixed-eps attack")
register_check("curve_far_above_fixed_eps", "Curves close to fixed-eps attacks", severity="info",
               needs=lambda results: _curves_needed(results, fixed=True),
               passed="at the audited eps no class's curve is 10 or more points above every fixed-eps attack")


# --------------------------------------------------------------------------- per-class checks


def _worst(findings) -> Callable[[dict], Optional[int]]:
    def worst(results: dict) -> Optional[int]:
        found = findings(results)
        return found[0].class_index if found else None
    return worst


register_check("class_multistep_weaker_than_fgsm", "Per class: multi-step attacks at least as strong as FGSM",
               scope="class", worst_class=_worst(class_checks.multistep_weaker_findings),
               needs=lambda results: (_missing(results, ("fgsm",))
                                      or _any_missing(results, class_checks.MULTI_STEP, "multi-step attack")),
               passed="on every class each multi-step attack's 95% interval overlaps or lies below FGSM's")
register_check("class_blackbox_stronger_than_whitebox", "Per class: black-box vs white-box", scope="class",
               worst_class=_worst(class_checks.blackbox_stronger_findings),
               needs=lambda results: (_blackbox_needs(results) or _any_missing(
                   results, class_checks.MULTI_STEP, "multi-step white-box attack")),
               passed="on every class Square's 95% interval overlaps or lies above each white-box attack's")
register_check("class_clean_below_chance", "Per class: clean accuracy not below chance", scope="class",
               worst_class=_worst(class_checks.clean_below_chance_findings), needs=_near_chance_needs,
               passed="no class's clean-accuracy 95% interval lies wholly below chance")


# --------------------------------------------------------------------------- the ledger


def _entry(check: KnownCheck, state: str, reason: str, worst: Optional[int] = None) -> dict:
    return {"id": check.id, "title": check.title, "state": state, "reason": reason, "severity": check.severity,
            "scope": check.scope, "class": worst}


def build_ledger(results: dict) -> List[dict]:
    """One entry per known check (list_checks() order), then one per flag no check owns."""
    flags = [flag for flag in results.get("checks") or [] if isinstance(flag, dict)]
    claimed = set()
    ledger = []
    for check in list_checks():
        own = [flag for flag in flags if check.owns(str(flag.get("id")))]
        claimed.update(id(flag) for flag in own)
        if own:
            reason = "; ".join(str(flag.get("message", "")) for flag in own)
            worst = check.worst_class(results) if check.worst_class is not None else None
            ledger.append(_entry(check, "failed", reason, worst))
            continue
        why_not = check.needs(results)
        failure = check.failed(results) if check.failed is not None and why_not is None else None
        if failure is not None:
            ledger.append(_entry(check, "failed", failure))
        elif why_not is not None:
            ledger.append(_entry(check, "not_run", why_not))
        else:
            ledger.append(_entry(check, "passed", check.passed(results)))
    for flag in flags:
        if id(flag) not in claimed:
            stray = KnownCheck(str(flag.get("id")), str(flag.get("id")), str(flag.get("severity") or "warning"),
                               "audit", lambda _: False, _always, lambda _: "")
            ledger.append(_entry(stray, "failed", str(flag.get("message", ""))))
    return ledger
