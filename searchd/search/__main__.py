"""``python -m searchd.search``: run (or resume) a schedule search. See ``--help``."""

import sys

from searchd.search.driver import main

if __name__ == "__main__":
    sys.exit(main())
