"""robaudit: class-wise adversarial robustness audits and fairer robust distillation.

As a library: `robaudit.scan(model, data) -> Audit`, `robaudit.remediate(teacher, data) ->
Remediation`, `robaudit.quick_audit(model, x, y) -> dict` (robaudit/api.py; docs/library.md).

Where things live: this folder (`robaudit/`) holds the CLI, the library front door, the
registries and the errors; the design card's top-level folders install under this name
(pyproject.toml [tool.setuptools.package-dir]): `audit/` -> `robaudit.audit`,
`audit/attacks/` -> `robaudit.audit.attacks`, `remediate/` -> `robaudit.remediate`,
`templates/` -> `robaudit.templates` (package data). See docs/architecture.md.
"""

__version__ = "0.1.0"

__all__ = ["scan", "remediate", "quick_audit", "Audit", "Comparison", "Remediation", "__version__"]

# `remediate` is the robaudit.remediate package, which is callable (remediate/__init__.py):
# robaudit.remediate(teacher, data, ...) runs robaudit.api.remediate.
_API = {"scan": "robaudit.api", "remediate": None, "quick_audit": "robaudit.api",
        "Audit": "robaudit.results", "Comparison": "robaudit.results", "Remediation": "robaudit.results"}


def __getattr__(name):
    # Imported on first use: `import robaudit` (the CLI, __version__) stays light, and
    # robaudit.audit modules that read robaudit.__version__ do not import the API.
    if name in _API:
        import importlib

        value = (importlib.import_module("robaudit.remediate") if _API[name] is None
                 else getattr(importlib.import_module(_API[name]), name))
        globals()[name] = value
        return value
    raise AttributeError(f"module 'robaudit' has no attribute {name!r}")
