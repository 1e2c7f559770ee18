"""The default remediation method, in a module of its own so that `common` (the shared
configuration) and `base` (the trainers) can both name it without importing each other."""

DEFAULT_METHOD = "absld"
