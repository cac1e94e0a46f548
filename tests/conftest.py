"""Shared pytest set-up: the repository root is importable (infer, evaluation, train, scripts); fixtures more than one test file uses."""
import sys
import zipfile
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


@pytest.fixture
def bytes_read(monkeypatch):
    """A list that collects the length of every read from a zip member."""
    got = []
    real = zipfile.ZipExtFile.read

    def counting(self, n=-1):
        data = real(self, n)
        got.append(len(data))
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting)
    return got
