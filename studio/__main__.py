"""`python -m adapter_studio ...`: see `adapter_studio.cli`."""

import sys

from .cli import main

sys.exit(main())
