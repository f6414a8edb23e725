"""``python -m stageserver``: the ``stageserver`` command (``cli.py``)."""

import sys

from .cli import main

sys.exit(main())
