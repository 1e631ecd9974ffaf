"""``python -m secorder``: the same as the ``secorder`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
