"""AutoAttack "standard" (Croce & Hein 2020) through the reference package pyautoattack.

APGD-CE, APGD-T, FAB-T, Square (5000 queries), L-inf, L2 or L1 (the package's norm='Linf'
/ 'L2' / 'L1' standard versions: same sub-attacks and budgets; under L1 the package's
standard version runs APGD-L1 with 5 restarts, its eps schedule 3, 2, 1 x eps
("use_largereps") and 5 APGD-T targets, Croce & Hein 2021, and the L1 Square), 100
iterations, each run only on the points the previous ones left robust. Deviations from
calling the package directly, each on purpose:
- targets: min(T, C - 1) for APGD-T and FAB-T, T the package's standard count (9; 5 for
  APGD-T under L1), which the package hard-codes and which indexes past the logits when
  C <= T; C comes from one forward pass. With C < 4 APGD-T is skipped: its targeted DLR
  loss needs the 4th-largest logit.
- inputs are made contiguous: the package's APGD gradient buffer copies the input's
  strides and `checks.check_zero_gradients` then fails on `grad.view` for NHWC
  arrays permuted to NCHW.
- its logging ('auto-attack' logger, warnings.warn) is collected, re-logged at DEBUG
  here and kept in `last_run["warnings"]`; nothing is printed at default levels.
- the global torch RNG (which the package reseeds per sub-attack) is restored after
  the run, and so is sys.settrace (its dynamic-defense check clears it).
- no state_path: the package's state stores a set's repr, which a new process
  refuses; the engine resumes by itself.
The package seeds per call, so AA results depend on which points share a batch
(unlike our own attacks); the whole batch handed in is one AA batch.
iterates does not apply (each sub-attack keeps any point it fooled).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Any, Dict, List

import torch

from robaudit.audit.attacks.base import Attack, register_attack
from robaudit.errors import UserError

logger = logging.getLogger(__name__)

AA_LOGGER = "auto-attack"


class _Collector(logging.Handler):
    """Receives the package's log records: re-logs them at DEBUG, keeps warnings."""

    def __init__(self, warnings_out: List[str]):
        super().__init__(logging.DEBUG)
        self.warnings_out = warnings_out

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        logger.debug("pyautoattack: %s", message)
        if record.levelno >= logging.WARNING and message not in self.warnings_out:
            self.warnings_out.append(message)


@contextlib.contextmanager
def quiet_third_party(device: torch.device, warnings_out: List[str]):
    """Collect pyautoattack's logging and warnings; restore global RNG and tracer."""
    aa_logger = logging.getLogger(AA_LOGGER)
    saved_level, saved_propagate = aa_logger.level, aa_logger.propagate
    handler = _Collector(warnings_out)
    aa_logger.addHandler(handler)
    aa_logger.propagate = False
    aa_logger.setLevel(logging.DEBUG if logger.isEnabledFor(logging.DEBUG) else logging.WARNING)
    saved_trace = sys.gettrace()
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for item in caught:
            message = str(item.message)
            logger.debug("pyautoattack warning: %s", message)
            if message not in warnings_out:
                warnings_out.append(message)
    finally:
        sys.settrace(saved_trace)
        aa_logger.removeHandler(handler)
        aa_logger.setLevel(saved_level)
        aa_logger.propagate = saved_propagate


def set_apgd_iterations(apgd, n_iter: int) -> None:
    """Change an APGD attack's budget after construction, with the checkpoint schedule
    its constructor derives from n_iter (as pyautoattack's own __init__ does)."""
    apgd.n_iter = n_iter
    apgd.n_iter_orig = n_iter
    apgd.n_iter_2 = max(int(0.22 * n_iter), 1)
    apgd.n_iter_min = max(int(0.06 * n_iter), 1)
    apgd.size_decr = max(int(0.03 * n_iter), 1)


# Our norm names -> pyautoattack's.
PACKAGE_NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}
# APGD-T's targets in the package's standard version, per norm (its _set_version).
STANDARD_APGD_TARGETS = {"linf": 9, "l2": 9, "l1": 5}


def build_autoattack(model, *, eps: float, seed: int, device, num_classes: int,
                     n_iter: int = 100, n_queries: int = 5000, max_targets: int = 9,
                     norm: str = "linf"):
    """pyautoattack.AutoAttack 'standard', adapted to C classes and the given budgets."""
    from pyautoattack import AutoAttack as ReferenceAutoAttack

    adversary = ReferenceAutoAttack(model, norm=PACKAGE_NORMS[norm], eps=eps, version="standard",
                                    seed=seed, device=device)
    adversary.verbose = False
    n_targets = max(min(max_targets, num_classes - 1), 0)
    adversary.apgd_targeted.n_target_classes = min(n_targets, STANDARD_APGD_TARGETS[norm])
    adversary.fab.n_target_classes = n_targets
    if num_classes < 4:
        adversary.attacks_to_run = [a for a in adversary.attacks_to_run if a != "apgd-t"]
    if n_iter != 100:
        set_apgd_iterations(adversary.apgd, n_iter)
        set_apgd_iterations(adversary.apgd_targeted, n_iter)
        adversary.fab.n_iter = n_iter
    adversary.square.n_queries = n_queries
    return adversary


@register_attack
class AutoAttack(Attack):
    """AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square) via pyautoattack.

    n_iter: APGD-CE, APGD-T and FAB-T iterations; n_queries: Square's queries;
    n_target_classes: the cap on targets, min(cap, C - 1) are used (APGD-T under L1: at
    most the package's 5).
    """

    name = "aa"
    white_box = True
    defaults = {"n_iter": 100, "n_queries": 5000, "n_target_classes": 9}
    fixed = {"version": "standard"}
    norms = ("linf", "l2", "l1")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # What the last call actually ran: classes, targets, sub-attacks, warnings.
        self.last_run: Dict[str, Any] = {}

    def _validate(self) -> None:
        for key in ("n_iter", "n_queries", "n_target_classes"):
            if getattr(self, key) < 1:
                raise UserError(f"attack 'aa': {key} must be >= 1, got {getattr(self, key)}")

    def _attack(self, model, x, y, index, clean_pred):
        x = x.contiguous()
        num_classes = int(model(x[:1]).shape[1])
        collected: List[str] = []
        with quiet_third_party(x.device, collected):
            adversary = build_autoattack(model, eps=self.eps, seed=self.seed, device=x.device,
                                         num_classes=num_classes, n_iter=self.n_iter,
                                         n_queries=self.n_queries,
                                         max_targets=self.n_target_classes, norm=self.norm)
            x_adv, adv_pred = adversary.run_standard_evaluation(x, y, batch_size=x.shape[0])
        self.last_run = {"num_classes": num_classes,
                         "n_target_classes": adversary.fab.n_target_classes,
                         "n_apgd_target_classes": adversary.apgd_targeted.n_target_classes,
                         "attacks": list(adversary.attacks_to_run),
                         "warnings": collected}
        return x_adv, adv_pred
