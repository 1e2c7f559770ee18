"""Square Attack (Andriushchenko et al. 2020), L-inf or L2, through pyautoattack; under L1
the package's L1 Square (Croce & Hein 2021, the Square of AutoAttack's L1 version).

Black-box: it only queries the model's logits, so it runs on models whose gradients
are refused (e.g. ONNX models that fail conversion and run through onnxruntime).
Configured as inside AutoAttack standard: 5000 queries, p_init 0.8, one restart,
margin loss, no rescaled schedule. Like AA it seeds the global torch RNG per call
(restored afterwards), so its results depend on which points share a batch.
iterates does not apply (Square keeps any point it fooled).
"""

from __future__ import annotations

from typing import List

from robaudit.audit.attacks.autoattack import PACKAGE_NORMS, quiet_third_party
from robaudit.audit.attacks.base import Attack, register_attack
from robaudit.errors import UserError


@register_attack
class Square(Attack):
    """Square Attack (black-box, L-inf, L2 or L1, 5000 queries) via pyautoattack."""

    name = "square"
    white_box = False
    defaults = {"n_queries": 5000, "p_init": 0.8, "n_restarts": 1}
    fixed = {"loss": "margin"}
    norms = ("linf", "l2", "l1")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_run: dict = {}

    def _validate(self) -> None:
        if self.n_queries < 1 or self.n_restarts < 1:
            raise UserError("attack 'square': n_queries and n_restarts must be >= 1")
        if not 0 < self.p_init <= 1:
            raise UserError(f"attack 'square': p_init must lie in (0, 1], got {self.p_init}")

    def _attack(self, model, x, y, index, clean_pred):
        from pyautoattack.square import SquareAttack

        x = x.contiguous()
        collected: List[str] = []
        with quiet_third_party(x.device, collected):
            adversary = SquareAttack(model, norm=PACKAGE_NORMS[self.norm], n_queries=self.n_queries, eps=self.eps,
                                     p_init=self.p_init, n_restarts=self.n_restarts,
                                     seed=self.seed, verbose=False, loss="margin",
                                     resc_schedule=False, device=x.device)
            x_adv = adversary.perturb(x, y)
        adv_pred = model(x_adv).argmax(dim=1)
        self.last_run = {"warnings": collected}
        return x_adv, adv_pred
