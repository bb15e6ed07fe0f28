"""``python -m cxr_core ...``: see cxr_core.cli."""
from __future__ import annotations

import sys

from cxr_core.cli import main

if __name__ == "__main__":
    sys.exit(main())
