"""``python -m testing.fake_upstream``: the fake upstream as a process (see ``main``)."""

import sys

from testing.fake_upstream import main

sys.exit(main())
