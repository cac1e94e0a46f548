"""Untrusted pickles end to end: ``python -m infer`` (a real subprocess) on case files and weights
whose pickles call ``os.system``, ``builtins.eval`` or ``subprocess`` refuses them, the payload
never runs (its marker file is never created), and every case whose image is readable still gets
an output. The unit-level refusals are in test_io.py and test_weights.py."""
from __future__ import annotations

import builtins
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tinymodel import make_artifact, make_release_folder, tiny_network

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (6, 20, 20)


class Payload:
    """Pickles as ``fn(*args)``: what an attacker puts into an object array or a checkpoint."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def payloads(marker: Path) -> dict:
    return {"os_system": Payload(os.system, (f"touch '{marker}'",)),
            "eval": Payload(builtins.eval, (f"open({str(marker)!r}, 'w').close()",)),
            "subprocess": Payload(subprocess.call, (["touch", str(marker)],))}


def _objects(*items):
    arr = np.empty(len(items), dtype=object)
    arr[:] = list(items)
    return arr


def write_poisoned_cases(folder: Path, marker: Path) -> dict:
    """One case per (payload, key it hides in); returns file name -> the poisoned key."""
    folder.mkdir()
    imgs = np.random.default_rng(0).integers(0, 255, SHAPE).astype(np.uint8)
    good_box = {"z_min": 1, "z_max": 4, "z_mid": 2, "z_mid_y_min": 3, "z_mid_y_max": 12,
                "z_mid_x_min": 3, "z_mid_x_max": 12}
    names = {}
    for kind, p in payloads(marker).items():
        variants = {
            "boxes": dict(boxes=_objects(p)),
            "boxes_nested": dict(boxes=_objects(dict(good_box, z_mid=p))),
            "clicks": dict(boxes=_objects(good_box), clicks=_objects({"fg": [p], "bg": []})),
            "clicks_order": dict(boxes=_objects(good_box), clicks=_objects({"fg": [[2, 5, 5]], "bg": []}),
                                 clicks_order=_objects([p])),
            "prev_pred": dict(boxes=_objects(good_box), prev_pred=_objects(p)),
            "spacing": dict(boxes=_objects(good_box), spacing=_objects(p)),
            "gts": dict(boxes=_objects(good_box), gts=_objects(p)),  # never opened at all
        }
        for key, members in variants.items():
            name = f"{kind}_{key}.npz"
            np.savez(folder / name, imgs=imgs, **members)
            names[name] = key.replace("_nested", "")
    return names


def malicious_artifact(path: Path, marker: Path) -> Path:
    art = make_artifact(path)
    sd = dict(tiny_network().state_dict(), evil=payloads(marker)["os_system"])
    torch.save(sd, art / "weights.pt")
    return art


def malicious_release(path: Path, marker: Path) -> Path:
    root = make_release_folder(path)
    ckpt = {"network_weights": tiny_network().state_dict(), "logging": {"x": [payloads(marker)["eval"]]},
            "init_args": {"configuration": "3d_fullres_ps16"}}
    torch.save(ckpt, root / "fold_0" / "checkpoint_final.pth")
    return root


def run_infer(inputs: Path, outputs: Path, weights: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infer", "--inputs", str(inputs), "--outputs", str(outputs),
                           "--weights", str(weights), "--device", "cpu", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("weights_kind", ["good", "malicious_artifact", "malicious_release"])
def test_poisoned_cases_and_weights_are_refused_end_to_end(tmp_path, weights_kind):
    marker = tmp_path / "PWNED"
    names = write_poisoned_cases(tmp_path / "in", marker)
    weights = {"good": lambda: make_artifact(tmp_path / "w"),
               "malicious_artifact": lambda: malicious_artifact(tmp_path / "w", marker),
               "malicious_release": lambda: malicious_release(tmp_path / "w", marker)}[weights_kind]()
    assert not marker.exists()
    proc = run_infer(tmp_path / "in", tmp_path / "out", weights)
    assert not marker.exists(), "a pickled payload ran"
    # refused cases fell back (4: outputs written, something fell back); bad weights: 3
    assert proc.returncode == (4 if weights_kind == "good" else 3), proc.stderr
    log = proc.stderr
    if weights_kind != "good":
        assert "cannot load weights" in log and "refused" in log
    for name in names:
        out = tmp_path / "out" / name
        assert out.exists(), (name, log)
        with np.load(out) as z:  # the output itself is plain: no pickle needed to read it
            segs = z["segs"]
        assert segs.shape == SHAPE and segs.dtype == np.uint8 and int(segs.max()) <= 1
        if name.endswith("_gts.npz") or weights_kind != "good":
            continue
        # the poisoned key was refused and named in one log line (a whole-case error, or for
        # prev_pred a warning: the case is segmented without it)
        key = names[name]
        refused = [line for line in log.splitlines() if line.startswith(f"infer: {name}: ") and "refused" in line]
        assert len(refused) == 1 and f"{key}:" in refused[0] and "refused" in refused[0], (name, log)
    if weights_kind == "good":  # gts is never opened: those cases are segmented normally
        assert all(f"{kind}_gts.npz: segmented" in log for kind in payloads(marker))
