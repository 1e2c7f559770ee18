"""The `Attack` base class: everything an evaluation attack has in common.

torchattacks-style split: the base owns eval mode, device, the [0, 1] range check,
which points are attacked (`score`), the eps-ball guard and the result bookkeeping;
a subclass only says how to perturb the points it is handed (`_attack`).

`SignGradientAttack` adds the one iterate loop shared by FGSM, PGD, CW-inf and
Temperature-PGD (random start, sign, L2 or sparse L1 steps through `ascent.ascent_step`,
"worst over iterates" scoring with early stopping, the per-step loss record behind the
`<attack>_loss_not_converged` check); those subclasses only write a loss.

Randomness of our own attacks comes from `rng.per_sample_uniform/normal`, keyed by
(seed, dataset index): a sample gets the same start whatever batch, shard or position
it lands in, and the global torch RNG is never touched.
"""

from __future__ import annotations

import abc
import math

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, NamedTuple, Optional, Tuple

import numpy as np
import torch

from robaudit.audit.attacks.ascent import NORMS, ascent_step, input_grad, per_sample_norm, project
from robaudit.audit.attacks.ascent_l1 import L1_TOP_FRACTION
from robaudit.audit.rng import per_sample_normal, per_sample_uniform
from robaudit.audit.modes import eval_mode
from robaudit.errors import UserError
from robaudit.options import coerce_option
from robaudit.registry import Registry

ITERATES = ("any", "final")

# Every attack registers itself where it is defined (`@register_attack` on the class).
ATTACKS = Registry("attack")


def register_attack(cls):
    """Class decorator: add an Attack subclass to ATTACKS under its `name` (help: its docstring)."""
    ATTACKS.register(cls.name)(cls)
    return cls

SCORES = ("robust", "adv-only")
NORM_LABELS = {"linf": "L-inf", "l2": "L2", "l1": "L1"}


def check_norm(attack_name: str, supported, norm: str) -> None:
    """Refuse, in one line, a norm nobody implements or one this attack lacks."""
    if norm not in NORMS:
        raise UserError(f"unknown norm {norm!r}; choose from: {', '.join(NORMS)}")
    if norm not in supported:
        others = ", ".join(name for name in ATTACKS.names() if norm in ATTACKS.get(name).norms)
        raise UserError(f"attack {attack_name} has no {norm} variant; attacks with one: {others}")
RANDOM_STARTS = ("uniform", "normal", "none")

# rng stream of the random start. Shared by every sign-gradient attack on purpose:
# PGD, CW and TPGD then start from the same point for a sample, so their differences
# come from the loss alone (and TPGD at T = 1 reproduces PGD exactly).
START_STREAM = 0
# Scale of the "normal" start: x + 0.001 * N(0, 1) (RSLAD/Fair-ARD convention).
NORMAL_START_SCALE = 0.001
# rng stream of the radius of the L2 / L1 uniform start (its direction comes from START_STREAM).
L2_RADIUS_STREAM = 1
# Default L2 (and L1) step size of the iterative attacks when none is given: 2.5 * eps /
# steps (Madry et al.'s rule, also robustness/torchattacks' PGD-L2 convention): the steps
# together can travel 2.5 ball radii, enough to cross the ball and come back. Under L1 a
# step is measured in L1 too (SLIDE's normalised sparse direction), so the rule carries over.
L2_STEP_FACTOR = 2.5
# Slack on the eps-ball guard: above float32 rounding of values in [0, 1] (6e-8),
# far below any perturbation that matters (1/255 = 3.9e-3).
BALL_TOLERANCE = 1e-6


def l2_ball_tolerance(dim: int, eps: float) -> float:
    """Slack of the L2 eps-ball guard for points with `dim` coordinates.

    float32 rounding, u = 6e-8 for values in [0, 1]: (a) x_adv = x + delta is rounded
    per coordinate, so x_adv - x recomputed differs from the renormed delta by <= u per
    coordinate, <= sqrt(dim) * u in L2; (b) the renorm's own norm (a float32 sum of dim
    squares, reduced pairwise/blockwise) is off by ~(log2(dim) + 2) * u relative, under
    2e-6 for dim up to ImageNet's 1.5e5. BALL_TOLERANCE * (sqrt(dim) + 2 * eps) covers both
    with a 16x margin on (a): 5.5e-5 at CIFAR's 3072 coordinates, against L2 budgets of 0.1-3.
    """
    return BALL_TOLERANCE * (math.sqrt(dim) + 2.0 * eps)


def l1_ball_tolerance(dim: int, eps: float) -> float:
    """Slack of the L1 eps-ball guard for points with `dim` coordinates.

    float32 rounding, u = 6e-8 for values in [0, 1]: (a) x_adv = x + delta is rounded per
    coordinate, so |x_adv - x| recomputed differs from |delta| by <= u per coordinate, <=
    dim * u summed (L1 adds the per-coordinate errors; nothing cancels in the worst case);
    (b) the guard's float32 sum of dim magnitudes is off by ~(log2(dim) + 2) * u relative.
    The projection itself (ascent_l1.l1_project) is float64, exact to ~1e-15. BALL_TOLERANCE
    * (dim + 2 * eps) covers both with a 16x margin on (a): 3.1e-3 at CIFAR's 3072
    coordinates and eps 12 (2.6e-4 of the radius); a perturbation that matters to an L1
    attack moves one coordinate by 1/255 = 3.9e-3 at least, more than the slack.
    """
    return BALL_TOLERANCE * (dim + 2.0 * eps)


@dataclass
class AttackResult:
    robust: torch.Tensor    # bool [B]: clean-correct (unless score="adv-only") and not fooled
    adv_pred: torch.Tensor  # int64 [B]: prediction at the fooling iterate, else the final one;
                            # the clean prediction for points that were not attacked
    x_adv: torch.Tensor     # [B, C, H, W]: ||x_adv - x|| <= eps in the attack's norm, inside [0, 1]
    # Per-sample extra outputs, [B] each (e.g. FMN's "min_norm"); points the attack did not
    # perturb get the attack's `extra_defaults` value. The engine stores them in samples.npz
    # as <key>_<attack>.
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)
    # Arrays that add up over samples (e.g. PGD's per-step loss sums); the engine sums them
    # over chunks and ranks and reports attack.diagnostics(totals) in results.json.
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)


class SubResult(NamedTuple):
    """What `_attack` may return instead of (x_adv, pred): the same plus extras/stats of
    the sub-batch it was handed (see AttackResult)."""
    x_adv: torch.Tensor
    pred: torch.Tensor
    extras: Dict[str, torch.Tensor] = {}
    stats: Dict[str, torch.Tensor] = {}


def format_value(key: str, value: Any, plain: bool = False) -> str:
    """How a hyper-parameter is written in a repr: eps-like values as k/255 (L-inf
    budgets; plain=True, used for L2, writes them as numbers)."""
    if isinstance(value, float) and key in ("eps", "step_size") and not plain:
        k = value * 255.0
        if abs(k * 10 - round(k * 10)) < 1e-6:
            return f"{round(k * 10) / 10:g}/255"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class Attack(abc.ABC):
    """Base of every evaluation attack; subclasses implement `_attack` only.

    eps: radius in [0, 1] pixel units, measured in `norm` ("linf": max |delta_i|, in
    [0, 1]; "l2": ||delta||_2 over the whole image, any value >= 0; "l1": sum |delta_i|,
    any value >= 0, e.g. 12 on CIFAR-10 as in AutoAttack's L1 evaluations). seed: keys all randomness.
    iterates: "any" (a point is fooled if any iterate fooled it) | "final" (only the
    last iterate is scored, as the papers' evaluators do); only iterative attacks use it.
    score: "robust" (attack clean-correct points only; the rest count as not robust) |
    "adv-only" (attack every point; robust = adversarial prediction == y, the Fair-ARD
    evaluation convention).
    """

    name: ClassVar[str] = ""
    white_box: ClassVar[bool] = True
    # Whether `iterates` changes anything for this attack (False: recorded as None).
    iterative: ClassVar[bool] = False
    # Hyper-parameters a user may override, with their defaults, in repr order.
    defaults: ClassVar[Dict[str, Any]] = {}
    # Fixed descriptors shown in the repr/params but not overridable (e.g. loss=ce).
    fixed: ClassVar[Dict[str, Any]] = {}
    # Threat models this attack implements (a subset of ascent.NORMS); any other is refused.
    norms: ClassVar[Tuple[str, ...]] = ("linf",)
    # Value of each per-sample extra (SubResult.extras) at points the attack did not perturb.
    extra_defaults: ClassVar[Dict[str, float]] = {}

    def __init__(self, eps: float = 8 / 255, seed: int = 0, iterates: str = "any",
                 score: str = "robust", norm: str = "linf", **params):
        check_norm(self.name, type(self).norms, norm)
        if iterates not in ITERATES:
            raise UserError(f"iterates must be one of {', '.join(ITERATES)}, got {iterates!r}")
        if score not in SCORES:
            raise UserError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
        eps = float(eps)
        if norm == "linf" and not 0.0 <= eps <= 1.0:
            raise UserError(f"eps must lie in [0, 1] (pixel units; 8/255 = 0.0314), got {eps}")
        if not (math.isfinite(eps) and eps >= 0.0):
            raise UserError(f"eps must be a finite number >= 0 ({NORM_LABELS[norm]} radius in [0, 1] "
                            f"pixel units), got {eps}")
        self.eps = eps
        self.norm = norm
        self.seed = int(seed)
        self.iterates = iterates
        self.score = score
        defaults = self.norm_defaults(params)
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            known = ", ".join(defaults) or "none"
            raise UserError(
                f"attack {self.name!r} has no parameter {unknown[0]!r}; its parameters: {known}"
            )
        self.hparams: Dict[str, Any] = {
            key: coerce_option(f"attack {self.name!r}", key, params.get(key, default), default)
            for key, default in defaults.items()
        }
        for key, value in self.hparams.items():
            setattr(self, key, value)
        self._validate()

    # ---- configuration -------------------------------------------------------------
    def norm_defaults(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """The hyper-parameter defaults under self.norm (subclass hook; `params` are the
        user's overrides, not yet checked). The class's `defaults` are the L-inf ones; a
        norm may add its own (L1's top_fraction), which only it accepts."""
        return dict(self.defaults)

    def _validate(self) -> None:
        """Subclass hook: reject impossible hyper-parameters with a UserError."""

    def params(self) -> Dict[str, Any]:
        """JSON-able configuration: class, eps, seed, scoring, every hyper-parameter, repr."""
        out: Dict[str, Any] = {"class": type(self).__name__, "eps": self.eps, "norm": self.norm,
                               "seed": self.seed,
                               "iterates": self.iterates if self.iterative else None,
                               "score": self.score}
        out.update(self.hparams)
        out.update(self.fixed)
        out["white_box"] = self.white_box
        out["repr"] = repr(self)
        return out

    def __repr__(self) -> str:
        items = [("eps", self.eps), ("norm", self.norm), *self.hparams.items(), *self.fixed.items()]
        if self.iterative:
            items.append(("iterates", self.iterates))
        items.append(("score", self.score))
        plain = self.norm != "linf"
        body = ", ".join(f"{key}={format_value(key, value, plain)}" for key, value in items)
        return f"{type(self).__name__}({body})"

    # ---- running ---------------------------------------------------------------------
    def attacked_mask(self, y: torch.Tensor, clean_pred: torch.Tensor) -> torch.Tensor:
        """bool [B]: the points this attack perturbs (n_attacked = its sum)."""
        if self.score == "adv-only":
            return torch.ones_like(y, dtype=torch.bool)
        return clean_pred == y

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                 clean_pred: torch.Tensor) -> AttackResult:
        if x.dim() != 4:
            raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
        batch = x.shape[0]
        for label, tensor in (("y", y), ("index", index), ("clean_pred", clean_pred)):
            if tensor.shape != (batch,):
                raise ValueError(f"{label} must have shape ({batch},), got {tuple(tensor.shape)}")
        if batch and (x.min() < 0 or x.max() > 1):
            raise UserError(
                f"attack inputs must lie in [0, 1] (got {x.min().item():.3g}..{x.max().item():.3g}); "
                "pass unnormalised images and give --mean/--std so the model normalises them"
            )
        device = x.device
        y = y.to(device=device, dtype=torch.long)
        index = index.to(device=device, dtype=torch.long)
        clean_pred = clean_pred.to(device=device, dtype=torch.long)

        robust = torch.zeros(batch, dtype=torch.bool, device=device)
        adv_pred = clean_pred.clone()
        x_adv = x.detach().clone()
        attacked = self.attacked_mask(y, clean_pred)
        extras = {key: torch.full((batch,), float(value), dtype=torch.float64, device=device)
                  for key, value in self.extra_defaults.items()}
        if not bool(attacked.any()):
            return AttackResult(robust=robust, adv_pred=adv_pred, x_adv=x_adv, extras=extras)

        chosen = attacked.nonzero().squeeze(1)
        # only ascent.input_grad re-enables grad, for inputs only
        with eval_mode(model, freeze_parameters=True), torch.no_grad():
            sub = SubResult(*self._attack(model, x[chosen].detach(), y[chosen],
                                          index[chosen], clean_pred[chosen]))

        sub_x = sub.x_adv.detach().to(device=device, dtype=x.dtype)
        self._check_ball(x[chosen], sub_x)
        x_adv[chosen] = sub_x
        adv_pred[chosen] = sub.pred.to(device=device, dtype=torch.long)
        robust[chosen] = adv_pred[chosen] == y[chosen]
        for key, values in sub.extras.items():
            extras.setdefault(key, torch.full((batch,), math.nan, dtype=torch.float64, device=device))
            extras[key][chosen] = values.detach().to(device=device, dtype=torch.float64)
        return AttackResult(robust=robust, adv_pred=adv_pred, x_adv=x_adv, extras=extras,
                            stats={key: value.detach() for key, value in sub.stats.items()})

    def diagnostics(self, stats: Dict[str, Any]) -> Dict[str, Any]:
        """JSON-able summary of the summed `stats` for results.json (subclass hook; default:
        the totals as lists)."""
        return {key: np.asarray(value, dtype=np.float64).reshape(-1).tolist() for key, value in stats.items()}

    @abc.abstractmethod
    def _attack(self, model, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                clean_pred: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Perturb the points handed in; return (x_adv, prediction on x_adv)."""

    def _check_ball(self, x: torch.Tensor, x_adv: torch.Tensor) -> None:
        # A fooled point outside the threat model would inflate the reported attack
        # success; third-party attacks (AutoAttack, Square) are checked too.
        if x.numel() == 0:
            return
        delta = (x_adv - x).flatten(1)
        if self.norm == "linf":
            excess = delta.abs().amax().item() - self.eps
            tolerance = BALL_TOLERANCE
        elif self.norm == "l2":
            excess = delta.norm(p=2, dim=1).amax().item() - self.eps
            tolerance = l2_ball_tolerance(delta.shape[1], self.eps)
        else:
            excess = delta.abs().sum(dim=1).amax().item() - self.eps
            tolerance = l1_ball_tolerance(delta.shape[1], self.eps)
        if excess > tolerance or x_adv.min() < 0 or x_adv.max() > 1:
            raise RuntimeError(
                f"{type(self).__name__} returned points outside the eps-ball or [0, 1] "
                f"({NORM_LABELS[self.norm]} excess {excess:.3g}); refusing to score them"
            )


# Early stop on a GPU: the fooled points are removed from the batch every this many steps
# (one any() and two nonzero() syncs each time); in between they are only frozen, by
# torch.where, without reading the device. On the CPU a "sync" costs nothing, so the points
# leave at once (every step) and the batches, hence the numbers, are those of before.
EARLY_STOP_EVERY_CUDA = 4


def early_stop_interval(device: torch.device) -> int:
    """Steps between compactions of the active set: 1 on the CPU, EARLY_STOP_EVERY_CUDA else."""
    return 1 if torch.device(device).type == "cpu" else EARLY_STOP_EVERY_CUDA


class SignGradientAttack(Attack):
    """Projected gradient ascent on a per-sample loss of the logits: L-inf sign steps,
    under norm="l2" normalised-gradient steps (step_size * g / ||g||_2) with the
    per-sample L2 renorm (ascent.l2_step), under norm="l1" SLIDE's sparse steps (sign(g)
    on the top_fraction largest-|g| coordinates the box does not block, L1-normalised)
    with the exact L1-ball-and-box projection (ascent_l1). Under l2 / l1 the default
    step_size is L2_STEP_FACTOR * eps / steps, and random_start="uniform" is
    x + r * eps * n / ||n|| (n ~ N(0, I), r ~ U[0, 1), per sample, ||.|| in the norm: the
    torchattacks PGD-L2 start), projected into the box.

    The iterate loop lives here once. Iterate 0 is the start (x, or the random start);
    iterate k + 1 = ascent_step(norm, iterate k). The forward that gives the gradient at
    iterate k also gives its prediction, and one forward follows the last step.
    iterates="any": a point whose prediction differs from y at some iterate is fooled
    there; it leaves the active set (exact early stop under this rule) and its x_adv /
    adv_pred are those of that iterate. iterates="final": every point takes every step
    and only the last iterate is scored.

    Loss record (stats "loss_sum_unfooled" [steps + 1], "n_unfooled" [1]): the loss of
    every point at every iterate it reaches, summed at the end over the points the attack
    did not fool (pred == y at the end), the ones where more steps could matter. Early
    stopping removes only fooled points, so every unfooled point has all steps + 1 losses
    and the mean per iterate is over one fixed set of points. diagnostics() turns the
    totals into the per-iterate mean that checks.loss_convergence_flags reads.
    """

    iterative = True
    white_box = True
    norms = ("linf", "l2", "l1")

    def norm_defaults(self, params):
        defaults = dict(self.defaults)
        if self.norm != "linf" and "step_size" in defaults and "step_size" not in params:
            steps = coerce_option(f"attack {self.name!r}", "steps",
                                  params.get("steps", defaults["steps"]), defaults["steps"])
            defaults["step_size"] = L2_STEP_FACTOR * self.eps / max(int(steps), 1)
        if self.norm == "l1":
            defaults["top_fraction"] = L1_TOP_FRACTION
        return defaults

    @abc.abstractmethod
    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample loss [B] to maximise."""

    # Subclasses give `steps`, `step_size` and `random_start` through `defaults`
    # (FGSM fixes steps = 1 and step_size = eps through properties).
    steps: int
    step_size: float
    random_start: str

    def _validate(self) -> None:
        if self.random_start not in RANDOM_STARTS:
            raise UserError(
                f"attack {self.name!r}: random_start must be one of {', '.join(RANDOM_STARTS)}, "
                f"got {self.random_start!r}"
            )
        if self.steps < 0:
            raise UserError(f"attack {self.name!r}: steps must be >= 0, got {self.steps}")
        if self.step_size < 0:
            raise UserError(f"attack {self.name!r}: step_size must be >= 0, got {self.step_size}")
        if self.norm == "l1" and not 0 < self.top_fraction <= 1:
            raise UserError(f"attack {self.name!r}: top_fraction must lie in (0, 1], got {self.top_fraction}")

    def start(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Iterate 0, a pure function of (seed, dataset index, x)."""
        if self.random_start == "none":
            return x.clone()
        shape = tuple(x.shape[1:])
        if self.random_start == "uniform" and self.norm == "linf":
            u = per_sample_uniform(self.seed, index, shape, stream=START_STREAM,
                                   device=x.device, dtype=x.dtype)
            return project(self.norm, x + self.eps * (2.0 * u - 1.0), x, self.eps)
        noise = per_sample_normal(self.seed, index, shape, stream=START_STREAM,
                                  device=x.device, dtype=x.dtype)
        if self.random_start == "uniform":  # l2 / l1: Gaussian direction, uniform radius
            radius = per_sample_uniform(self.seed, index, (1,) * len(shape), stream=L2_RADIUS_STREAM,
                                        device=x.device, dtype=x.dtype)
            length = per_sample_norm(self.norm, noise).clamp_min(1e-12)
            return project(self.norm, x + self.eps * radius * noise / length, x, self.eps)
        return project(self.norm, x + NORMAL_START_SCALE * noise, x, self.eps)

    def _logits_and_grad(self, model, x_cur: torch.Tensor, y: torch.Tensor):
        captured: Dict[str, torch.Tensor] = {}

        def loss_fn(x_in: torch.Tensor) -> torch.Tensor:
            logits = model(x_in)
            if not logits.requires_grad:
                raise UserError(
                    f"the model gives no input gradients, so the white-box attack {self.name!r} "
                    "cannot run on it; use the black-box attack 'square'"
                )
            captured["logits"] = logits
            return self.loss(logits, y)

        loss, grad = input_grad(loss_fn, x_cur)
        return captured["logits"].detach(), loss, grad

    def _attack(self, model, x, y, index, clean_pred):
        n = x.shape[0]
        x_cur = self.start(x, index)
        x_adv = x_cur.clone()
        adv_pred = torch.empty(n, dtype=torch.long, device=x.device)
        active = torch.arange(n, device=x.device)  # batch positions still being attacked
        x_ref, y_ref = x, y
        early_stop = self.iterates == "any"
        every = early_stop_interval(x.device)
        # Rows of the active set fooled at an earlier iterate (not yet removed), with the
        # iterate and prediction that fooled them: removal waits for the next compaction.
        frozen = torch.zeros(n, dtype=torch.bool, device=x.device)
        x_hit, pred_hit = x_cur, adv_pred
        losses = torch.full((n, self.steps + 1), math.nan, dtype=torch.float64, device=x.device)
        for step in range(self.steps + 1):
            last = step == self.steps
            if last:
                logits = model(x_cur)
                loss = self.loss(logits, y_ref)
                grad: Optional[torch.Tensor] = None
            else:
                logits, loss, grad = self._logits_and_grad(model, x_cur, y_ref)
            losses[active, step] = torch.where(frozen, losses[active, step], loss.detach().double())
            pred = logits.argmax(dim=1)
            if early_stop and not last:
                first = (pred != y_ref) & ~frozen
                x_hit = torch.where(first.view(-1, *[1] * (x_cur.dim() - 1)), x_cur, x_hit)
                pred_hit = torch.where(first, pred, pred_hit)
                frozen = frozen | first
            if last:
                x_adv[active] = torch.where(frozen.view(-1, *[1] * (x_cur.dim() - 1)), x_hit, x_cur)
                adv_pred[active] = torch.where(frozen, pred_hit, pred)
                break
            if early_stop and step % every == 0 and bool(frozen.any()):
                # Compact: the fooled rows leave with the iterate that fooled them.
                done, keep = frozen.nonzero().squeeze(1), (~frozen).nonzero().squeeze(1)
                x_adv[active[done]] = x_hit[done]
                adv_pred[active[done]] = pred_hit[done]
                active, x_cur, x_ref, y_ref, grad, x_hit, pred_hit = (
                    active[keep], x_cur[keep], x_ref[keep], y_ref[keep], grad[keep], x_hit[keep], pred_hit[keep])
                frozen = frozen[keep]
                if active.numel() == 0:
                    break
            x_cur = ascent_step(self.norm, x_cur, grad, x_ref, self.eps, self.step_size,
                                getattr(self, "top_fraction", L1_TOP_FRACTION))
        unfooled = adv_pred == y
        stats = {"loss_sum_unfooled": losses[unfooled].sum(dim=0),
                 "n_unfooled": unfooled.sum().reshape(1).double()}
        return SubResult(x_adv, adv_pred, {}, stats)

    def diagnostics(self, stats):
        """{"n_unfooled", "loss_mean_unfooled": per-iterate mean loss of the points left
        unfooled (None when there are none)}: what checks.loss_convergence_flags reads."""
        n_unfooled = int(round(float(np.asarray(stats["n_unfooled"]).sum())))
        sums = np.asarray(stats["loss_sum_unfooled"], dtype=np.float64).reshape(-1)
        return {"n_unfooled": n_unfooled,
                "loss_mean_unfooled": (sums / n_unfooled).tolist() if n_unfooled else None}
