"""benchmarks/ is not installed: its tests find it with the repository's root last on the path,
after the installed packages (the root's folder names, `proto` among them, must not shadow them)."""

import pathlib
import sys

_ROOT = str(pathlib.Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
