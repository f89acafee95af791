"""Adapter families. Importing this package registers every family with `studio.registry`."""
from . import agd  # noqa: F401,E402  (AGD: guidance distilled into adapters)
from . import ip_adapter  # noqa: F401,E402  (IP-Adapter: image prompts)
