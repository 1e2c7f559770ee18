"""The identity "attack": clean accuracy through the same bookkeeping as the others."""

from __future__ import annotations

from robaudit.audit.attacks.ascent import NORMS
from robaudit.audit.attacks.base import Attack, register_attack


@register_attack
class Clean(Attack):
    """No perturbation: robust = clean-correct, x_adv = x."""

    name = "clean"
    # Neither white- nor black-box; False so that it runs on every model, including
    # ones whose gradients were refused.
    white_box = False
    norms = NORMS  # no perturbation: the same under every threat model

    def _attack(self, model, x, y, index, clean_pred):
        return x.clone(), clean_pred.clone()

    def __repr__(self) -> str:
        return "Clean()"
