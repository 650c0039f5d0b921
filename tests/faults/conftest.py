"""The fault and load suite (issue: faults, load and hostile input). Its helpers live in
``tests/`` beside the other tests' (``test_storage_support``), so ``tests/`` is importable."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent.parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
