"""``python -m launcher``: see the package's docstring."""

import sys

from launcher import main

sys.exit(main())
