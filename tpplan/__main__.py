"""``python -m tpplan``: the same as the ``tpplan`` command."""

import sys

from .cli import main

sys.exit(main())
