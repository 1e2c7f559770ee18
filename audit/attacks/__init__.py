"""Evaluation attacks: `ATTACKS` registry, `create_attack`, the `Attack` base.

Each attack registers itself where it is defined (`@register_attack`, in base.py);
importing this package imports every attack module, so ATTACKS holds them all. A new
attack is one module here with a decorated `Attack` subclass, plus its import below.
"""

from __future__ import annotations

from typing import List

from robaudit.audit.attacks.autoattack import AutoAttack
from robaudit.audit.attacks.base import ATTACKS, Attack, AttackResult, SignGradientAttack, register_attack
from robaudit.audit.attacks.clean import Clean
from robaudit.audit.attacks.cw import CW, cw_margin_loss
from robaudit.audit.attacks.fgsm import FGSM
from robaudit.audit.attacks.fmn import FMN
from robaudit.audit.attacks.pgd import PGD
from robaudit.audit.attacks.square import Square
from robaudit.audit.attacks.tpgd import TPGD, tempered_ce_loss


def list_attacks() -> List[str]:
    """Registered attack names, sorted."""
    return ATTACKS.names()


def create_attack(name: str, eps: float = 8 / 255, seed: int = 0, iterates: str = "any",
                  score: str = "robust", norm: str = "linf", **overrides) -> Attack:
    """Build a registered attack; overrides set its hyper-parameters (steps=10, ...).
    norm: "linf" | "l2" (eps in that norm); an attack without it raises a UserError."""
    return ATTACKS.create(name, eps=eps, seed=seed, iterates=iterates, score=score, norm=norm,
                          **overrides)


__all__ = ["ATTACKS", "Attack", "AttackResult", "SignGradientAttack", "create_attack", "register_attack",
           "list_attacks", "Clean", "FGSM", "PGD", "CW", "TPGD", "AutoAttack", "Square",
           "cw_margin_loss", "tempered_ce_loss"]
