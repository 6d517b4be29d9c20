"""``python -m source_callback``: the ``source-callback`` command line."""

import sys

from source_callback.cli import main

if __name__ == "__main__":
    sys.exit(main())
