"""``python -m lorafuse``: the ``lorafuse`` command line."""

import sys

from .cli import main

sys.exit(main())
