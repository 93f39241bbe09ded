"""Which gpt_2_simple the bench/ scripts import: this checkout's sources when a development build
put the extension beside them (CONTRIBUTING.md), else the installed package (`pip install .`).
The sources alone cannot run: without the built `_engine` the engine suites would fail."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "python"

if any((SOURCES / "gpt_2_simple").glob("_engine*.so")):
    sys.path.insert(0, str(SOURCES))
