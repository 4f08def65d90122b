"""``python -m prefixattn ...``: the same as the ``prefixattn`` console script."""

import sys

from .cli import main

sys.exit(main())
