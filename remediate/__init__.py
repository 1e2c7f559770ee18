"""robaudit.remediate: fairer robust students by distillation (ABSLD) and the baselines.

Module map (docs/architecture.md has the whole picture):
- `base`: the `METHODS` registry of trainers, the per-batch `RemediationMethod` base class
  and `ClassState` (the per-class quantities a method declares for metrics.csv and the report);
- one module per method family: `distillation` (RSLAD, Fair-RSLAD, ABSLD),
  `adversarial_training` (SAT, TRADES, CFA), `ard` (ARD, Fair-ARD), `frl` (FRL fine-tuning),
  `ferd` (data-free FERD, its own loop; options in `ferd_options`, generator, loss terms,
  teacher hooks and synthetic bank in `ferd_synthesis`, the information bottleneck in `ferd_ib`);
- `train`: the shared loop for per-batch methods (validation split, checkpoint selection,
  torchrun); `common`, `checkpoints`, `export`: what every trainer shares (configuration,
  student, runtime, results block, student audit; atomic checkpoints and resume; export).

Adding a method is one module with one `@METHODS.register` class (see docs/architecture.md,
"How to add a method"); importing this package imports every family so they register.

Where this lives: the repository's top-level folder `remediate/` installs as the import
name `robaudit.remediate` (pyproject.toml [tool.setuptools.package-dir]; see
docs/architecture.md).
"""

import sys
import types

from robaudit.remediate.base import (
    DEFAULT_METHOD,
    METHODS,
    ClassState,
    RemediationMethod,
    Trainer,
    batch_method_names,
    create_method,
    list_methods,
)
from robaudit.remediate import adversarial_training, distillation, ferd  # noqa: F401  (registration)
from robaudit.remediate import ard, frl  # noqa: F401  (registration: ARD / Fair-ARD, FRL)
from robaudit.remediate.common import RemediateConfig
from robaudit.remediate.distillation import default_tau_bounds
from robaudit.remediate.train import run_remediate, scale_milestones

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "ClassState",
    "RemediateConfig",
    "RemediationMethod",
    "Trainer",
    "batch_method_names",
    "create_method",
    "default_tau_bounds",
    "list_methods",
    "run_remediate",
    "scale_milestones",
]


class _CallableModule(types.ModuleType):
    """`robaudit.remediate(teacher, data, ...)` is the library's remediation call
    (robaudit/api.py `remediate`), while `robaudit.remediate.METHODS` & co. stay this package:
    the package and the function share the name the issue asks for, so the package is callable."""

    def __call__(self, *args, **kwargs):
        from robaudit.api import remediate

        return remediate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
