"""`python -m megaface ...` is the same CLI as the `megaface` console script."""

import sys

from megaface.cli import main

if __name__ == "__main__":
    sys.exit(main())
