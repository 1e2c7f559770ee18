"""robaudit: class-wise adversarial robustness audits and fairer robust distillation."""

__version__ = "0.1.0"
