"""A complete remediation method in one file, as docs/architecture.md "How to add a method"
describes: importing this module registers it; nothing else in robaudit names it.

Toy re-weighting: plain cross-entropy on the clean image (no inner attack), each sample
weighted by its class's weight, which after every epoch becomes 1.5 - that class's
training accuracy (a class the student gets wrong more often weighs more).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robaudit.remediate.base import METHODS, ClassState, RemediationMethod, tensor_list

NAME = "toy-reweight"
TOY_WEIGHT = ClassState("toy_weight", "Toy per-class weight (1.5 - training accuracy)")


@METHODS.register(NAME, help="toy: class-weighted cross-entropy (a test of the method registry)")
class ToyReweight(RemediationMethod):
    name = NAME
    needs_teacher = False
    records_clean = False
    _state_attrs = ("weights",)

    def __init__(self, num_classes: int, *, base_weight: float = 1.5, **common):
        super().__init__(num_classes, **common)
        self.base_weight = float(base_weight)
        self.weights = torch.ones(self.num_classes)

    def options(self) -> dict:
        return {**super().options(), "base_weight": self.base_weight}

    def class_state(self):
        return (TOY_WEIGHT,)

    def attack(self, student, teacher_logits, x, y, index, epoch):
        return x.detach()

    def loss(self, student, teacher_logits, x, y, index, epoch):
        self._ensure_device(x.device)
        logits = student(x)
        per_sample = F.cross_entropy(logits.float(), y, reduction="none")
        loss = (per_sample * self.weights.to(x.device)[y]).mean()
        self._record_batch(y, logits, None)
        return loss, {"loss": loss.detach()}

    def end_epoch(self, epoch, *, student=None, **validation):
        accuracy = self._class_means(3)                       # before the base class resets the tallies
        self.weights = torch.where(torch.isnan(accuracy), self.weights, self.base_weight - accuracy)
        record = super().end_epoch(epoch, student=student, **validation)
        record["toy_weight"] = tensor_list(self.weights)
        return record
