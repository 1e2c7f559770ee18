"""robaudit.audit: load -> adapt -> attack -> results.json -> report."""
