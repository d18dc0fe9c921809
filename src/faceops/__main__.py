"""``python -m faceops ARGS`` is ``faceops ARGS``: torchrun starts a module, not a console script."""

import sys

from faceops.cli import main

if __name__ == "__main__":
    sys.exit(main())
