"""Shared pytest set-up: the repository root is importable (infer, evaluation, train, scripts)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Run a test with one torch thread: small models are as fast on one, and far faster on a busy
    CPU (other threads spin waiting for a core)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
