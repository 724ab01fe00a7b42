"""``python -m qdetr``: the command line (see :mod:`qdetr.cli`)."""

import sys

from qdetr.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
