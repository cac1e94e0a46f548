"""Shared pytest set-up: the repository root is importable (infer, evaluation, train, scripts)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
