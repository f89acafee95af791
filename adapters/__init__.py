"""Adapter families. Importing this package registers every family with `studio.registry`."""
