"""The predictor's outputs are bit-identical to the recorded golden hashes (scripts/golden.py).

The hashes are CPU float32 results of the torch version named in the JSON; under another version
the comparison is skipped (rounding may legitimately differ there)."""
import json

import pytest
import torch

from scripts import golden

pytestmark = pytest.mark.slow


def test_outputs_match_the_recorded_hashes():
    stored = json.loads(golden.GOLDEN.read_text())
    if stored["meta"]["torch"] != torch.__version__:
        pytest.skip(f"hashes recorded with torch {stored['meta']['torch']}, this is {torch.__version__}")
    got = golden.compute()
    want = stored["outputs"]
    assert sorted(got) == sorted(want)
    differ = sorted(k for k in want if got[k] != want[k])
    assert not differ, f"{len(differ)} of {len(want)} outputs changed: {differ[:10]}"
