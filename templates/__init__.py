"""robaudit.templates: the report's jinja2 template, CSS and JS (package data).

Where this lives: the repository's top-level folder `templates/` installs as the import name
`robaudit.templates` (pyproject.toml [tool.setuptools.package-dir]); the report reads the
files as package resources (jinja2.PackageLoader, importlib.resources).
"""
