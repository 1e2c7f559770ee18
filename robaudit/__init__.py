"""robaudit: class-wise adversarial robustness audits and fairer robust distillation.

Where things live: this folder (`robaudit/`) holds the CLI, the registries and the errors;
the design card's top-level folders install under this name (pyproject.toml
[tool.setuptools.package-dir]): `audit/` -> `robaudit.audit`, `audit/attacks/` ->
`robaudit.audit.attacks`, `remediate/` -> `robaudit.remediate`, `templates/` ->
`robaudit.templates` (package data). See docs/architecture.md.
"""

__version__ = "0.1.0"
