"""robaudit.audit: load -> adapt -> attack -> results.json -> report.

Where this lives: the repository's top-level folder `audit/` installs as the import name
`robaudit.audit` (pyproject.toml [tool.setuptools.package-dir]); `audit/attacks/` is
`robaudit.audit.attacks`. The map of every import name to its folder is in
docs/architecture.md.
"""
