"""Reliability checks (AutoAttack's checks.py in spirit): every flag explains itself.

Each check returns dicts {"id", "severity", "message", "why"} for results["checks"].
`message` says what was seen (with numbers) and what to try; `why` says why it
matters for trusting the robustness numbers. docs/checks.md lists them all.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from robaudit.audit.class_checks import class_flags


def _flag(id: str, severity: str, message: str, why: str) -> Dict[str, str]:
    return {"id": id, "severity": severity, "message": message, "why": why}


def model_checks(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 white_box: bool, info: Optional[dict] = None) -> List[Dict[str, str]]:
    """Checks on one probe batch (already on the model's device), before attacking.

    `info`, when given, receives {"input_gradients": bool} for white-box models: False
    when the loss has no gradient path back to the input at all (the engine then refuses
    white-box attacks up front instead of failing half-way through a scan).
    """
    flags = []
    info = {} if info is None else info
    with torch.no_grad():
        z1 = model(x).float()
        z2 = model(x).float()
    drift = (z1 - z2).abs().max().item()
    if drift > 1e-4 * max(1.0, z1.abs().max().item()):
        flags.append(_flag(
            "nondeterministic_output", "warning",
            f"two identical forward passes differ by up to {drift:.3g}: dropout or batch-norm "
            "may have been left in training mode in the exported model",
            "a randomised model defeats gradient attacks by noise (gradient obfuscation), so "
            "robust accuracy is overestimated; re-export the model in eval mode"))
    rows_sum = z1.sum(dim=1)
    if bool((z1 >= 0).all()) and bool(((rows_sum - 1).abs() < 1e-3).all()):
        flags.append(_flag(
            "probability_outputs", "warning",
            "the model's outputs are non-negative and sum to 1 on every row: they look like "
            "probabilities (softmax), not logits",
            "cross-entropy over softmax(probabilities) has tiny, saturated gradients and makes a "
            "model look robust; pass --output probs (or --output auto) so robaudit attacks their "
            "logarithm, or export the model without its final softmax"))
    top2 = z1.topk(min(2, z1.shape[1]), dim=1).values
    tied = (top2[:, 0] == top2[:, -1]).float().mean().item() if z1.shape[1] > 1 else 0.0
    zeros = (z1 == 0).float().mean().item()
    if tied > 0.2 or zeros > 0.5:
        flags.append(_flag(
            "tied_or_zero_logits", "warning",
            f"{tied:.0%} of probe inputs have exactly tied top logits and {zeros:.0%} of logits "
            "are exactly zero (e.g. a ReLU on the output layer)",
            "flat, clipped outputs give zero gradients, so gradient attacks fail and the robust "
            "numbers of gradient attacks are only upper bounds"))
    if white_box:
        grad = _probe_input_grad(model, x, y)
        info["input_gradients"] = grad is not None
        if grad is None:
            flags.append(_flag(
                "zero_gradients", "warning",
                "the model's outputs have no gradient with respect to its inputs (detached or "
                "non-differentiable forward)",
                "gradient attacks cannot run on such a model; the black-box Square attack "
                "(--attacks square) does not need gradients"))
        else:
            zero_rows = (grad.flatten(1).abs().amax(dim=1) == 0).float().mean().item()
            if zero_rows > 0.1:
                flags.append(_flag(
                    "zero_gradients", "warning",
                    f"the input gradient of the loss is exactly zero for {zero_rows:.0%} of probe inputs",
                    "gradient attacks cannot move those points, so their robust numbers are upper "
                    "bounds (gradient masking); the black-box Square attack (--attacks square) does "
                    "not need gradients"))
    return flags


def _probe_input_grad(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Optional[torch.Tensor]:
    """d CE / d x on the probe batch, or None when the output does not depend on x through autograd."""
    x_in = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x_in).float(), y, reduction="none")
        if not loss.requires_grad:
            return None
        (grad,) = torch.autograd.grad(loss.sum(), x_in, allow_unused=True)
    return grad


def _boundary_hint(results: dict) -> str:
    """What robaudit fed the model (results model.adaptations) and the boundary flags to try."""
    adapt = (results.get("model") or {}).get("adaptations") or {}
    layout_info = adapt.get("input_layout") or {}
    layout = layout_info.get("layout", "nchw")
    value_range = (adapt.get("input_range") or {}).get("range", "0-1")
    fed = (f"robaudit fed it {layout.upper()} images in {value_range.replace('-', '..')} "
           + ("normalised by --mean/--std" if adapt.get("normalize") else "without --mean/--std"))
    if layout_info.get("requested") == "auto" and layout_info.get("reason"):
        fed += f" (layout: {layout_info['reason']})"
    other_range = "0-255" if value_range == "0-1" else "0-1"
    other_layout = "nhwc" if layout == "nchw" else "nchw"
    return (f"{fed}; try --input-range {other_range}, --input-layout {other_layout}, --mean/--std "
            f"with the model's normalisation, or --class-map FILE if its class order differs "
            f"from the dataset's")


def result_checks(results: dict) -> List[Dict[str, str]]:
    """Checks on the finished per-attack numbers."""
    flags = []
    attacks = results["attacks"]
    num_classes = results["dataset"]["num_classes"]

    def avg(name) -> Optional[float]:
        return attacks[name]["avg"] if name in attacks else None

    clean = avg("clean")
    if clean is not None and num_classes > 1 and clean <= 1.5 / num_classes:
        flags.append(_flag(
            "near_chance", "warning",
            f"clean accuracy {clean:.1%} is near chance (1/{num_classes} = {1 / num_classes:.1%}): "
            "the model probably sees its inputs differently from how it was trained; "
            + _boundary_hint(results),
            "robustness numbers of a model that is wrong on clean inputs say nothing about "
            "the model as deployed"))
    pgd, fgsm = avg("pgd"), avg("fgsm")
    if pgd is not None and fgsm is not None and pgd > fgsm + 0.02:
        flags.append(_flag(
            "pgd_weaker_than_fgsm", "warning",
            f"PGD-20 leaves {pgd:.1%} robust but one-step FGSM only {fgsm:.1%}",
            "an iterative attack that does worse than a single step suggests gradient masking; "
            "trust the lower numbers and run AutoAttack (aa) and Square"))
    aa = avg("aa")
    if pgd is not None and aa is not None and pgd - aa > 0.10:
        flags.append(_flag(
            "aa_much_stronger", "warning",
            f"AutoAttack leaves {aa:.1%} robust, {pgd - aa:.1%} below PGD-20's {pgd:.1%}",
            "a large gap means PGD's gradients mislead it (masking or a hard loss surface); "
            "report the AutoAttack numbers, not PGD's"))
    square = avg("square")
    for name in ("pgd", "aa"):
        white = avg(name)
        if square is not None and white is not None and square < white - 0.02:
            flags.append(_flag(
                f"blackbox_stronger_than_{name}", "warning",
                f"the black-box Square attack ({square:.1%} robust) beats white-box {name} "
                f"({white:.1%})",
                "a gradient-free attack should not beat a gradient attack on a differentiable "
                "model; the gradients are likely masked"))
    eps = results["config"]["eps"]
    for name, block in attacks.items():
        if name == "clean" or clean is None or eps <= 0:
            continue
        if block.get("n_attacked", 0) >= 20 and block["avg"] >= clean - 1e-12 and clean > 0:
            flags.append(_flag(
                f"no_effect_{name}", "warning",
                f"{name} did not fool a single clean-correct point at eps={eps:.4g}",
                "at a non-zero eps some points are almost always fooled; none means the attack "
                "could not use the model's gradients (masking) or eps is far too small"))
    # class sizes are the same in every block: read them from whichever ran
    sized = results["attacks"].get("clean") or next(iter(attacks.values()), None) or results.get("ensemble")
    small = [c["class"] for c in (sized or {}).get("per_class", []) if 0 < c["n"] < 30]
    if small:
        flags.append(_flag(
            "small_classes", "info",
            f"{len(small)} class(es) have fewer than 30 samples (e.g. {small[0]!s})",
            "with few samples a class accuracy carries a wide 95% interval; compare classes by "
            "their intervals, not their point estimates, or audit more samples"))
    flags += curve_checks(results)
    flags += loss_convergence_flags(attacks)
    flags += class_flags(results)   # per class: where the average hides one (audit/class_checks.py)
    return flags


def refused_attack_flag(attack: str, reason: str) -> Dict[str, str]:
    return _flag(
        f"refused_{attack}", "warning",
        f"white-box attack {attack} was not run: {reason}",
        "without trustworthy gradients only black-box attacks (square) can be run; their "
        "robust accuracy is an upper bound")


# ---- did the iterative attacks' loss stop improving? (attacks.<name>.diagnostics) ------------
# The "incomplete optimization" indicator of Pintor et al. 2022 ("Indicators of Attack Failure",
# NeurIPS; their released code): rescale the loss curve to [0, 1] over the run, take its running
# best, and flag when the last iterates still improve it by more than 5% of the run's range.
LOSS_LATE_GAIN = 0.05
# Their window is the last 10 iterates of attacks run for hundreds; for PGD-20 that would be half
# the run, so the window here is the last 10% of the steps, and at least the last 2.
LOSS_WINDOW_SHARE = 0.10
LOSS_WINDOW_MIN = 2
# A mean over fewer unfooled points says little about the attack (and the check is off for
# one-step attacks: FGSM's single step is its design).
LOSS_MIN_POINTS = 5


def loss_late_gain(curve) -> Optional[float]:
    """Share of the run's loss improvement (running best, i.e. max so far) made in the last
    max(2, ceil(10% of steps)) steps; None when the curve is too short or never improved."""
    losses = np.asarray(curve, dtype=np.float64)
    steps = len(losses) - 1
    if steps < LOSS_WINDOW_MIN or not np.isfinite(losses).all():
        return None
    best = np.maximum.accumulate(losses)
    span = best[-1] - best[0]
    if span <= 1e-12 * max(1.0, float(np.abs(best).max())):
        return None
    window = max(LOSS_WINDOW_MIN, int(np.ceil(LOSS_WINDOW_SHARE * steps)))
    return float((best[-1] - best[-1 - window]) / span)


def loss_convergence_flags(attacks: dict) -> List[Dict[str, str]]:
    """`<attack>_loss_not_converged` for every iterative attack whose mean loss over the points it
    left unfooled still rose over its last steps (attacks.<name>.diagnostics, base.SignGradientAttack)."""
    flags = []
    for name, block in attacks.items():
        diagnostics = block.get("diagnostics") or {}
        curve = diagnostics.get("loss_mean_unfooled")
        if not curve or diagnostics.get("n_unfooled", 0) < LOSS_MIN_POINTS:
            continue
        gain = loss_late_gain(curve)
        if gain is None or gain <= LOSS_LATE_GAIN:
            continue
        steps = len(curve) - 1
        window = max(LOSS_WINDOW_MIN, int(np.ceil(LOSS_WINDOW_SHARE * steps)))
        flags.append(_flag(
            f"{name}_loss_not_converged", "warning",
            f"{name}'s mean loss over the {diagnostics['n_unfooled']} points it left unfooled still rose "
            f"in its last {window} of {steps} steps: {gain:.0%} of the run's gain (from "
            f"{curve[0]:.4g} to {max(curve):.4g}) came there; rerun with more steps (--attack-opt "
            f"{name}.steps={2 * steps}) or a larger step_size",
            "an attack stopped while its loss still improves has not finished its search: more "
            "steps would likely fool some of these points, so its robust accuracy is an "
            "overestimate (incomplete optimisation, Pintor et al. 2022)"))
    return flags


# ---- robustness curves (results["curves"], a minimal-norm attack such as fmn) ----------------
# Share of the clean-correct points an unbounded minimal-norm attack may leave unfooled before
# the curve is flagged for not reaching 0 (the "unconstrained attack fails" indicator of
# Pintor et al. 2022, with room for a stray point in small audits).
CURVE_UNFOOLED_SHARE = 0.01
# A curve and a fixed-eps attack are measured on the same points, so a per-class gap of d points
# at the audited eps means >= d discordant points all falling one way. Were each attack equally
# likely to be the one that finds a discordant point (plain attack noise), that has probability
# <= 0.5**d (one-sided sign test): d >= 5 gives <= 0.031, so gaps of 5+ points are flagged.
CURVE_GAP_POINTS = 5
# "Far above": the curve leaves >= 10 points more of a class robust than the strongest fixed-eps
# attack (the threshold of aa_much_stronger).
CURVE_FAR_ABOVE = 0.10


def _audited_position(block: dict) -> int:
    eps = np.asarray(block["eps"], dtype=np.float64)
    return int(np.argmin(np.abs(eps - float(block["audited_eps"]))))


def _class_gaps(curve_rows: list, fixed_rows: list, at: int) -> list:
    """Per class (fixed accuracy - curve accuracy at grid position `at`, that gap in points);
    None where either side has no data."""
    gaps = []
    for curve, fixed in zip(curve_rows, fixed_rows):
        value = curve["accuracy"][at]
        if value is None or fixed.get("accuracy") is None or not curve["n"]:
            gaps.append(None)
            continue
        gap = fixed["accuracy"] - value
        gaps.append((gap, int(round(abs(gap) * curve["n"]))))
    return gaps


def curve_checks(results: dict) -> List[Dict[str, str]]:
    """curve_not_reaching_zero, curve_below_fixed_eps, curve_far_above_fixed_eps (docs/checks.md)."""
    flags: List[Dict[str, str]] = []
    curves = results.get("curves") or {}
    attacks = results["attacks"]
    fixed = [name for name in attacks if name != "clean" and name not in curves]
    classes = (results.get("dataset") or {}).get("classes") or []
    for name, block in curves.items():
        overall = block["overall"]
        clean_correct = int(round((overall["accuracy"][0] or 0.0) * overall["n"]))
        unfooled = int(sum(block["not_found"]))
        if clean_correct and unfooled > CURVE_UNFOOLED_SHARE * clean_correct:
            flags.append(_flag(
                "curve_not_reaching_zero", "warning",
                f"{name} never fooled {unfooled} of {clean_correct} clean-correct points "
                f"({unfooled / clean_correct:.1%}) at any perturbation size",
                "an attack without a budget should fool every point of a differentiable model; points "
                "it cannot fool point to masked or vanishing gradients or too few steps, so every "
                f"robust number here is an upper bound: raise --attack-opt {name}.steps, run square"))
        at = _audited_position(block)
        gaps = {other: _class_gaps(block["per_class"], attacks[other]["per_class"], at) for other in fixed}
        # below: any fixed attack leaves CURVE_GAP_POINTS+ more points robust than the curve
        below = [(gap[0], gap[1], k, other) for other, rows in gaps.items()
                 for k, gap in enumerate(rows) if gap is not None and gap[0] > 0 and gap[1] >= CURVE_GAP_POINTS]
        # far above: the curve is CURVE_FAR_ABOVE above the strongest fixed attack of the class
        above = []
        for k in range(len(classes)):
            known = [(gaps[other][k], other) for other in fixed if gaps[other][k] is not None]
            if known:
                (gap, points), other = min(known, key=lambda item: item[0][0])
                if -gap >= CURVE_FAR_ABOVE and points >= CURVE_GAP_POINTS:
                    above.append((-gap, points, k, other))
        eps_text = f"eps={block['audited_eps']:.4g}"
        if below:
            gap, points, k, other = max(below)
            count = len({b[2] for b in below})
            flags.append(_flag(
                "curve_below_fixed_eps", "warning",
                f"at the audited {eps_text} the {name} curve is below a fixed-eps attack's robust "
                f"accuracy in {count} class(es); worst: {classes[k]}, {gap:.1%} ({points} points) below "
                f"{other}",
                f"{name} found adversarial points inside the eps-ball that {other} missed, so that "
                "attack's numbers are not the tightest; the ensemble already counts "
                f"{name}'s fooled points, so trust the ensemble (or add steps/restarts to {other})"))
        if above:
            gap, points, k, other = max(above)
            flags.append(_flag(
                "curve_far_above_fixed_eps", "info",
                f"at the audited {eps_text} the {name} curve is >= {CURVE_FAR_ABOVE:.0%} above every "
                f"fixed-eps attack in {len(above)} class(es); worst: {classes[k]} "
                f"({gap:.1%} above {other}, {points} points)",
                "minimal-norm attacks trade strength at one eps for the whole curve, so at the audited "
                "eps trust the fixed-eps attacks (and the ensemble); read the curve's shape and the "
                "median minimal perturbation as upper bounds"))
    return flags
