"""``python -m captchatask_operator``: the same as ``captchatask operator``."""

import sys

from captchatask_operator.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
