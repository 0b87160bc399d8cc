"""``python -m infl``: the same as the ``infl`` command."""

import sys

from infl.cli import main

sys.exit(main())
