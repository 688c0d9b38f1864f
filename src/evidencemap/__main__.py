"""``python -m evidencemap``: the command line (see :mod:`evidencemap.cli`)."""

import sys

from evidencemap.cli import main

if __name__ == "__main__":
    sys.exit(main())
