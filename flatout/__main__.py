"""`python -m flatout ...` runs the command line, as the `flatout` script does."""

import sys

from flatout.cli import main

if __name__ == "__main__":
    sys.exit(main())
