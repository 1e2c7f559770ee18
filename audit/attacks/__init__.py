"""Evaluation attacks: `ATTACKS` registry, `create_attack`, the `Attack` base.

Importing this package registers clean, fgsm, pgd, cw, tpgd, aa and square.
"""

from __future__ import annotations

from typing import List

from robaudit.audit.attacks.autoattack import AutoAttack
from robaudit.audit.attacks.base import Attack, AttackResult, SignGradientAttack
from robaudit.audit.attacks.clean import Clean
from robaudit.audit.attacks.cw import CW, cw_margin_loss
from robaudit.audit.attacks.fgsm import FGSM
from robaudit.audit.attacks.pgd import PGD
from robaudit.audit.attacks.square import Square
from robaudit.audit.attacks.tpgd import TPGD, tempered_ce_loss
from robaudit.registry import Registry

ATTACKS = Registry("attack")
for _attack_class in (Clean, FGSM, PGD, CW, TPGD, AutoAttack, Square):
    ATTACKS.register(_attack_class.name)(_attack_class)


def list_attacks() -> List[str]:
    """Registered attack names, sorted."""
    return ATTACKS.names()


def create_attack(name: str, eps: float = 8 / 255, seed: int = 0, iterates: str = "any",
                  score: str = "robust", **overrides) -> Attack:
    """Build a registered attack; overrides set its hyper-parameters (steps=10, ...)."""
    return ATTACKS.create(name, eps=eps, seed=seed, iterates=iterates, score=score, **overrides)


__all__ = ["ATTACKS", "Attack", "AttackResult", "SignGradientAttack", "create_attack",
           "list_attacks", "Clean", "FGSM", "PGD", "CW", "TPGD", "AutoAttack", "Square",
           "cw_margin_loss", "tempered_ce_loss"]
