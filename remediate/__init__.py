"""robaudit.remediate: fairer robust students by distillation (ABSLD) and the baselines.

`methods` holds the per-batch losses and per-class state updates (ABSLD, RSLAD,
Fair-RSLAD, SAT, TRADES, CFA); `train` holds the training loop that drives them,
selects a checkpoint on a validation split, exports the student and re-audits it.

Where this lives: the repository's top-level folder `remediate/` installs as the import
name `robaudit.remediate` (pyproject.toml [tool.setuptools.package-dir]; see
docs/architecture.md).
"""

from robaudit.remediate.methods import (
    DEFAULT_METHOD,
    METHODS,
    RemediationMethod,
    create_method,
    default_tau_bounds,
    list_methods,
)
from robaudit.remediate.train import RemediateConfig, run_remediate, scale_milestones

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "RemediateConfig",
    "RemediationMethod",
    "create_method",
    "default_tau_bounds",
    "list_methods",
    "run_remediate",
    "scale_milestones",
]
