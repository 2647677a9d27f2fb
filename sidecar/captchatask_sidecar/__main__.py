"""``python -m captchatask_sidecar``: the same as ``captchatask sidecar``."""

import sys

from captchatask_sidecar.cli import main

sys.exit(main())
