"""``python -m trioqueue``: the ``trioqueue`` command (see docs/cli.md)."""

import sys

from .cli import main

sys.exit(main())
