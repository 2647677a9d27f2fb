"""``python -m captchatask.testbed up|down|env``, the same as ``captchatask testbed ...``."""

import sys

from captchatask.testbed.cli import cli_main

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
