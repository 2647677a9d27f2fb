"""``python -m captchatask.emulator``: the emulator as a separate process."""

import sys

from captchatask.emulator.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
