"""Which registered architecture a weights-only file was saved from, read off its keys and shapes.

A state_dict, checkpoint or safetensors file holds tensors, not the network: without
--arch, `infer_architecture` builds every registered architecture on the meta device
(shapes only, no memory, no initialisation cost) and keeps those whose state_dict keys
and shapes equal the file's exactly (after audit/models/formats.py has stripped wrapper
prefixes). The WideResNet family is open-ended (`wrn-D-W`, any D = 6n+4 and W), so its
depth and width are read off the shapes (`architectures.infer_wide_resnet`) instead of
trying the listed sizes; every head's class count comes from the head's weight shape.
When no registered architecture fits, torchvision's ImageNet classifiers of the family
the keys point to are tried the same way (audit/models/torchvision_inference.py), so a
torchvision ResNet-18 state_dict is inferred as `torchvision:resnet18`; and `--arch NAME`
on weights that fit another form exactly says which, with the exact flag.

Exactly one match is loaded, and how it was chosen is recorded (`ModelInfo.arch_inferred`
-> results.json model.arch_inferred). No match is a one-line refusal naming the closest
architectures. Several matches are forms with the same keys but different forwards (the
PreAct ResNet-18 shortcut forms): a wrong pick would audit another network without any
error, so they are only told apart by clean accuracy on a probe batch of the audited data
when the difference is decisive (`decide_by_probe`), and refused otherwise.

RobustBench-style `mu` / `sigma` buffers (a normalisation the original forward applies
first) are split off here (`split_normalization_buffers`) and become the boundary's
normalisation, so the input is normalised once, in the one place robaudit records it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from robaudit.audit.models.architectures import (ARCHITECTURES, PREACT_RESNET18_FORMS, create_architecture,
                                          infer_wide_resnet, resolve_architecture)
from robaudit.audit.metrics import binomial_upper_tail, mcnemar_exact_p
from robaudit.errors import UserError

INFERRED_HOW = "matched keys and shapes"
PROBED_HOW = "matched keys and shapes; chosen by clean accuracy on a probe batch"
# Up to this many images of the audited data decide between same-key forms: enough for
# the test below to separate a trained form from a broken one (~90% vs ~10% accuracy)
# many times over, small enough to cost a few forward passes per candidate.
PROBE_SIZE = 256
# A decisive win: at least this many accuracy points over every other candidate ...
DECISIVE_MARGIN = 0.10
# ... and significant at this level, both the paired test against each other candidate and
# the test against chance. Strict on purpose: a wrong pick silently audits another network,
# while refusing only costs the user an --arch flag.
DECISIVE_ALPHA = 1e-3
# Keys of RobustBench-style normalisation buffers (PreActResNet / WideResNet wrappers).
NORMALIZATION_KEYS = ("mu", "sigma")
FILE_NORMALIZATION_SOURCE = "the file's mu/sigma buffers"
CLOSEST_SHOWN = 3

# Scores one candidate: (module with the file's weights, its ModelInfo) -> bool [n], which
# probe images it classifies correctly through the boundary it would be audited with.
CandidateScorer = Callable[[nn.Module, object], torch.Tensor]


@dataclass
class Fit:
    """How a file's weights fit one architecture (built with the head the weights have)."""
    name: str
    num_classes: int
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    wrong_shape: List[str] = field(default_factory=list)   # "key: file [..], arch [..]"

    @property
    def mismatches(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.wrong_shape)

    @property
    def exact(self) -> bool:
        return self.mismatches == 0


# --- normalisation buffers ---------------------------------------------------------------

def _channel_values(tensor: torch.Tensor) -> Optional[List[float]]:
    """The per-channel values of a [C] or [1, C, 1, 1] buffer, else None."""
    shape = tuple(tensor.shape)
    if tensor.ndim == 1 or (tensor.ndim == 4 and shape[0] == shape[2] == shape[3] == 1):
        return [float(v) for v in tensor.detach().float().flatten()]
    return None


def split_normalization_buffers(state: Mapping[str, torch.Tensor]
                                ) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, object]]]:
    """(state without `mu`/`sigma`, {"mean", "std", "source"}) when the file has both in a
    per-channel shape; otherwise the state unchanged and None (odd buffers stay in, so
    they show up as unexpected keys rather than being applied in a guessed way)."""
    if not all(k in state for k in NORMALIZATION_KEYS):
        return dict(state), None
    mean, std = (_channel_values(state[k]) for k in NORMALIZATION_KEYS)
    if mean is None or std is None or len(mean) != len(std):
        return dict(state), None
    rest = {k: v for k, v in state.items() if k not in NORMALIZATION_KEYS}
    return rest, {"mean": mean, "std": std, "source": FILE_NORMALIZATION_SOURCE}


def reconcile_own_normalization(module: nn.Module, file_norm: Optional[Dict[str, object]], path: str,
                                notes: List[str]) -> Optional[Dict[str, object]]:
    """The file's normalisation for the boundary, or None when the module normalises its
    own input (DM models): then mu/sigma must say the same, since applying both would
    normalise twice and applying either alone could contradict the other."""
    own = getattr(module, "input_normalization", None)
    if file_norm is None or own is None:
        return file_norm
    if not (_close(file_norm["mean"], own["mean"]) and _close(file_norm["std"], own["std"])):
        raise UserError(f"{path} has mu/sigma buffers (mean {_fmt(file_norm['mean'])}, std "
                        f"{_fmt(file_norm['std'])}) but its architecture normalises its own input with "
                        f"mean {_fmt(own['mean'])}, std {_fmt(own['std'])}; remove one of them from the file")
    notes.append("the file's mu/sigma buffers equal the model's own input normalisation; "
                 "applied once, inside the model")
    return None


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    # Normalisation constants are typed with 4 decimals (0.4914) and stored in float32.
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-4) for x, y in zip(a, b))


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


# --- matching keys and shapes ------------------------------------------------------------

def head_out_features(module: nn.Module, state: Mapping[str, torch.Tensor]) -> Optional[int]:
    """Class count the weights' final Linear layer was trained with, if it has one."""
    linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    weight = state.get(f"{linears[-1]}.weight")
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None


def fit_architecture(name: str, state: Mapping[str, torch.Tensor], num_classes: int = 10) -> Fit:
    """How `state` fits architecture `name`, built on the meta device with the weights' head."""
    with torch.device("meta"):
        module = create_architecture(name, num_classes=num_classes)
        classes = head_out_features(module, state) or num_classes
        if classes != num_classes:
            module = create_architecture(name, num_classes=classes)
        adapt = getattr(module, "adapt_to_state_dict", None)
        if adapt is not None:
            adapt(list(state))
        expected = module.state_dict()
    return compare_keys(name, expected, state, classes)


def compare_keys(name: str, expected, state, classes: int) -> Fit:
    """How `state` fits an architecture whose own state_dict is `expected` (keys and shapes)."""
    fit = Fit(name=name, num_classes=classes)
    # Checkpoints from before torch 0.4.1 lack BatchNorm's num_batches_tracked, which eval ignores.
    fit.missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    fit.unexpected = [k for k in state if k not in expected]
    fit.wrong_shape = [f"{k}: file {list(state[k].shape)}, arch {list(expected[k].shape)}"
                       for k in expected if k in state and state[k].shape != expected[k].shape]
    return fit


def _is_listed_wide_resnet(name: str) -> bool:
    return name.startswith(("wrn-", "dm-wrn-"))


def candidate_names(state: Mapping[str, torch.Tensor]) -> List[str]:
    """Registered architectures worth trying: the listed WRN sizes give way to the one size
    the shapes say (any D and W), and stay in only when the shapes say none."""
    wide = infer_wide_resnet(state)
    names = [n for n in ARCHITECTURES.names() if wide is None or not _is_listed_wide_resnet(n)]
    return names + ([wide] if wide is not None and wide not in names else [])


def fits_for(state: Mapping[str, torch.Tensor], num_classes: int = 10) -> List[Fit]:
    """Every candidate's fit, best (fewest mismatched keys) first; ties keep registry order."""
    fits = [fit_architecture(name, state, num_classes) for name in candidate_names(state)]
    return sorted(fits, key=lambda f: f.mismatches)


def summarise(keys: List[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")


def fitting_forms(state: Mapping[str, torch.Tensor], num_classes: int = 10) -> List[str]:
    """Every architecture name (registered, or `torchvision:NAME`) the weights fit exactly."""
    from robaudit.audit.models.torchvision_inference import exact_fits

    exact = [f.name for f in fits_for(state, num_classes) if f.exact]
    return exact or [f.name for f in exact_fits(state, num_classes)]


def mismatch_error(fit: Fit, path: str, state: Optional[Mapping[str, torch.Tensor]] = None) -> UserError:
    """The refusal for weights that do not fit the --arch the user named; given `state`, it
    names the forms the weights do fit, with the exact flag."""
    parts = []
    if fit.missing:
        parts.append(f"{len(fit.missing)} missing ({summarise(fit.missing)})")
    if fit.unexpected:
        parts.append(f"{len(fit.unexpected)} unexpected ({summarise(fit.unexpected)})")
    if fit.wrong_shape:
        parts.append(f"{len(fit.wrong_shape)} with another shape ({summarise(fit.wrong_shape, 2)})")
    hint = "check --arch"
    forms = fitting_forms(state, fit.num_classes) if state is not None else []
    if forms:
        hint = (f"the weights fit {' and '.join(forms)} exactly: pass "
                f"{' or '.join(f'--arch {name}' for name in forms)}")
    return UserError(f"weights in {path} do not match arch {fit.name!r}: {'; '.join(parts)}; {hint}")


def no_match_error(fits: List[Fit], path: str, kind: str) -> UserError:
    closest = ", ".join(f"{f.name} ({f.mismatches} mismatched keys)" for f in fits[:CLOSEST_SHOWN])
    return UserError(f"{path} holds only weights ({kind}) and they match no registered architecture "
                     f"exactly (closest: {closest}), nor a torchvision classifier of the family their keys "
                     f"point to; pass --arch NAME (see `robaudit list`)")


def same_key_twins(arch: str, state: Mapping[str, torch.Tensor], num_classes: int) -> List[str]:
    """Other registered forms the weights fit just as exactly as `arch` (for a note when
    --arch chose among them). Only the PreAct ResNet-18 forms share keys, so only they are
    tried: trying every architecture on each --arch load would cost for nothing."""
    if arch not in PREACT_RESNET18_FORMS:
        return []
    return [name for name in PREACT_RESNET18_FORMS
            if name != arch and fit_architecture(name, state, num_classes).exact]


# --- building ----------------------------------------------------------------------------

def build_with_weights(name: str, state: Mapping[str, torch.Tensor], num_classes: int) -> nn.Module:
    """Architecture `name` with the weights loaded (they were checked to fit exactly)."""
    module = create_architecture(name, num_classes=num_classes)
    adapt = getattr(module, "adapt_to_state_dict", None)
    if adapt is not None:
        adapt(list(state))
    module.load_state_dict(state, strict=False)  # strict but for a missing num_batches_tracked
    return module


# --- telling same-key forms apart --------------------------------------------------------

def decisive_reason(winner: torch.Tensor, other: torch.Tensor, num_classes: int) -> Optional[str]:
    """None if `winner` (bool correct-per-image) beats `other` decisively, else why not.

    Decisive means all three: the margin is at least DECISIVE_MARGIN (a significant but
    small gap could come from two forms that are both wrong), McNemar's paired test on
    these images rejects "equally good" at DECISIVE_ALPHA (on a small probe 10 points can
    be noise), and the winner is significantly above chance 1/C (two broken forms can
    differ by luck, and neither is the network that was trained).
    """
    n = int(winner.numel())
    gap = float(winner.float().mean() - other.float().mean())
    if gap < DECISIVE_MARGIN:
        return f"a gap of {100 * gap:.1f} points, under {100 * DECISIVE_MARGIN:.0f}"
    paired = mcnemar_exact_p(int((winner & ~other).sum()), int((other & ~winner).sum()))
    if paired > DECISIVE_ALPHA:
        return f"McNemar p = {paired:.2g} on {n} images, above {DECISIVE_ALPHA:g}"
    chance = binomial_upper_tail(int(winner.sum()), n, 1.0 / max(num_classes, 1))
    if chance > DECISIVE_ALPHA:
        return f"the best is not clearly above chance (1/{num_classes}; p = {chance:.2g})"
    return None


def _accuracy_text(accuracy: Dict[str, float]) -> str:
    return ", ".join(f"{name} {100 * acc:.1f}%" for name, acc in accuracy.items())


def _either_arch(names: Sequence[str]) -> str:
    return " or ".join(f"--arch {name}" for name in names)


def _ambiguity(names: Sequence[str], path: str) -> str:
    return (f"weights in {path} fit {', '.join(names[:-1])} and {names[-1]} exactly "
            f"(same keys and shapes, different forwards)")


def decide_by_probe(fits: List[Fit], modules: Dict[str, nn.Module], infos: Dict[str, object],
                    scorer: CandidateScorer, path: str) -> Tuple[str, Dict[str, object]]:
    """(name, probe record) of the decisively best same-key form, or a one-line refusal."""
    names = [f.name for f in fits]
    what = _ambiguity(names, path)
    correct = {name: scorer(modules[name], infos[name]).reshape(-1).bool().cpu() for name in names}
    accuracy = {name: round(float(c.float().mean()), 4) for name, c in correct.items()}
    ranked = sorted(names, key=lambda name: -accuracy[name])
    best, n = ranked[0], int(correct[ranked[0]].numel())
    classes = next(f.num_classes for f in fits if f.name == best)
    for other in ranked[1:]:
        why_not = decisive_reason(correct[best], correct[other], classes)
        if why_not is not None:
            raise UserError(f"{what}, and clean accuracy on a probe batch of {n} images "
                            f"({_accuracy_text(accuracy)}) does not decide between them ({best} vs "
                            f"{other}: {why_not}); pass {_either_arch(names)}")
    rule = (f"best clean accuracy, at least {100 * DECISIVE_MARGIN:.0f} points above every other form, "
            f"McNemar p <= {DECISIVE_ALPHA:g} against each, and above chance (binomial p <= "
            f"{DECISIVE_ALPHA:g})")
    return best, {"n": n, "accuracy": accuracy, "rule": rule}


# --- the whole decision --------------------------------------------------------------------

def infer_architecture(state: Mapping[str, torch.Tensor], kind: str, path: str, num_classes: int,
                       file_norm: Optional[Dict[str, object]], make_info: Callable[[str, Optional[dict]], object],
                       scorer: Optional[CandidateScorer], notes: List[str]
                       ) -> Tuple[Fit, nn.Module, Optional[dict], Dict[str, object]]:
    """(fit, module with the weights, normalisation for the boundary, arch_inferred record).

    `make_info(name, boundary_norm)` gives the ModelInfo a candidate would be audited with
    (so the probe runs it through the same boundary); `scorer` is None without probe data.
    """
    fits = fits_for(state, num_classes)
    exact = [f for f in fits if f.exact]
    if not exact:
        from robaudit.audit.models.torchvision_inference import exact_fits

        exact = exact_fits(state, num_classes)   # torchvision's ImageNet classifiers, by family
    if not exact:
        raise no_match_error(fits, path, kind)
    if len(exact) > 1 and scorer is None:  # refused before building any of them
        names = [f.name for f in exact]
        raise UserError(f"{_ambiguity(names, path)} and no probe batch of the audited data was given "
                        f"to tell them apart; pass {_either_arch(names)}")
    modules = {f.name: build_with_weights(f.name, state, f.num_classes) for f in exact}
    norms = {name: reconcile_own_normalization(m, file_norm, path, []) for name, m in modules.items()}
    record: Dict[str, object] = {"how": INFERRED_HOW, "candidates": [f.name for f in exact]}
    if len(exact) == 1:
        chosen = exact[0]
    else:
        infos = {name: make_info(name, norms[name]) for name in modules}
        name, probe = decide_by_probe(exact, modules, infos, scorer, path)
        chosen = next(f for f in exact if f.name == name)
        record.update(how=PROBED_HOW, probe=probe)
        notes.append(f"{name} chosen over {', '.join(n for n in modules if n != name)} (same keys, "
                     f"different forwards) by clean accuracy on a probe batch of {probe['n']} images: "
                     f"{_accuracy_text(probe['accuracy'])}")
    reconcile_own_normalization(modules[chosen.name], file_norm, path, notes)  # its note, once
    resolver_note = resolve_architecture(chosen.name)[1]
    notes.append(f"architecture {chosen.name} inferred from the weights' keys and shapes (no --arch given)"
                 + (f"; {resolver_note}" if resolver_note else ""))
    return chosen, modules[chosen.name], norms[chosen.name], record


def probe_batch(x: torch.Tensor, y: torch.Tensor, size: int = PROBE_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Up to `size` images and labels spread evenly over the data (deterministic, so every
    run and every torchrun rank decides alike; evenly spread so a class-sorted subset
    contributes every class)."""
    n = int(len(y))
    if n <= size:
        return x, y
    positions = torch.linspace(0, n - 1, steps=size).round().long()
    return x[positions], y[positions]
