"""Adapter families, one package each (`ip_adapter`, `agd`, ...).

Importing this package loads no family: each family's `family.FAMILY` is found by `adapter_studio.registry` through
its entry point (pyproject.toml, group `adapter_studio.families`), so a family loads only when it is used.
"""
