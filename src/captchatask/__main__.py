"""``python -m captchatask``: the same as the ``captchatask`` console script."""

import sys

from captchatask.cli import main

sys.exit(main())
