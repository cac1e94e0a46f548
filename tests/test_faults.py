"""Faults: a process killed while writing, device out-of-memory errors, a network slower than the
time budget. Stub networks with known answers; a fake clock instead of real sleeping."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import infer.writer
import infer.predictor
from infer.__main__ import main
from infer.card import ModelCard
from infer.writer import write_segs
from infer.predictor import Predictor
from tests.tinymodel import tiny_arch

ROOT = Path(__file__).resolve().parents[1]
PATCH = (16, 32, 32)


def card(box_style="3d"):
    return ModelCard(architecture=tiny_arch(), input_channels=8, num_classes=2, patch_size=PATCH,
                     box_style=box_style, click_radius=4, prompt_decay=0.9)


def box(z0, z1, y0, y1, x0, x1):
    """Organizer box dict, inclusive bounds."""
    return {"z_min": z0, "z_max": z1, "z_mid": (z0 + z1) // 2, "z_mid_y_min": y0, "z_mid_y_max": y1,
            "z_mid_x_min": x0, "z_mid_x_max": x1}


def case_with(shape, **kw):
    c = {"imgs": np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8), "spacing": (1.0, 1.0, 1.0),
         "name": "t.npz", "boxes": None, "clicks": None, "clicks_order": None, "prev_pred": None}
    c.update(kw)
    return c


class Stub(torch.nn.Module):
    """Foreground where the box+ channel is above 0.5 (``everywhere=True``: foreground in the
    whole patch). ``oom(call_number, x)`` -> True raises a device out-of-memory error. Records
    every input's box channel. ``clock``/``seconds``: each pass advances a fake clock."""

    def __init__(self, oom=None, everywhere=False, clock=None, seconds=0.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))  # so .to() has something to move
        self.oom, self.everywhere, self.clock, self.seconds = oom, everywhere, clock, seconds
        self.calls, self.box_channels, self.devices = 0, [], []

    def forward(self, x):
        self.calls += 1
        self.devices.append(self.w.device.type)
        if self.clock is not None:
            self.clock.t += self.seconds
        if self.oom is not None and self.oom(self.calls, x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB (stub)")
        self.box_channels.append(x[0, 2].clone())
        fg = torch.full_like(x[:, 2], 50.0) if self.everywhere else 50.0 * (x[:, 2] - 0.5)
        return torch.stack([torch.zeros_like(fg), fg], 1)


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO, logger="infer")
    return caplog


# ---------------------------------------------------------------- killed while writing
def _size(path):
    """Size of ``path`` in bytes; -1 when it is gone (the writer renamed or removed it)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


@pytest.mark.slow
def test_process_killed_while_writing_a_large_output_leaves_no_partial_file(tmp_path):
    """A real ``python -m infer`` writing a 256 MB output is SIGKILLed as soon as new bytes show
    up in the output folder (its temporary file holding data, or the final file changing; the
    empty probe file that checks the folder is writable at start does not count). The final name
    still holds the previous stage's file, intact. (No weights: the case gets its all-zero
    fallback, which goes through the same writer as a prediction.)"""
    shape = (256, 1024, 1024)
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    np.savez_compressed(inp / "case.npz", imgs=np.zeros(shape, np.uint8))  # ~250 kB on disk
    final = out / "case.npz"
    old = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for attempt in range(3):
        write_segs(final, old)  # the previous stage's output
        old_stat = final.stat()
        proc = subprocess.Popen([sys.executable, "-m", "infer", "--inputs", str(inp), "--outputs", str(out),
                                 "--weights", str(tmp_path / "no_weights"), "--device", "cpu"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seen = None
        try:
            t_end = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < t_end:
                tmp = [n for n in os.listdir(out) if n != "case.npz" and _size(out / n) > 0]
                st = final.stat()
                if tmp or (st.st_size, st.st_mtime_ns, st.st_ino) != (old_stat.st_size, old_stat.st_mtime_ns,
                                                                      old_stat.st_ino):
                    proc.send_signal(signal.SIGKILL)
                    seen = tmp
                    break
                time.sleep(0.0005)
        finally:
            if proc.poll() is None and seen is None:
                proc.kill()
            proc.wait(timeout=30)
        if seen is not None and proc.returncode == -signal.SIGKILL:
            break
    else:
        pytest.fail("never caught the writer in the act in 3 attempts")
    # under the final name: the old file, complete and loadable
    with np.load(final) as z:
        assert np.array_equal(z["segs"], old)
    assert sorted(p.name for p in out.glob("*.npz")) == ["case.npz"]
    leftovers = [n for n in os.listdir(out) if n != "case.npz"]
    assert leftovers and all(n.startswith(".tmp-") and _size(out / n) > 0 for n in leftovers)  # hidden, not *.npz


# ---------------------------------------------------------------- device out of memory
def test_out_of_memory_on_the_first_pass_retries_the_class_at_zoom_1(logs):
    # box 40 x 80 x 80 > patch 16 x 32 x 32: planned zoom > 1; the retry runs at zoom 1, where
    # the crop lies inside the box (box channel all ones)
    net = Stub(oom=lambda n, x: n == 1)
    pred = Predictor(net, card(), "cpu", autozoom=False)
    segs = pred.predict(case_with((48, 96, 96), boxes=[box(4, 43, 8, 87, 8, 87)]))
    assert net.calls == 2
    assert bool((net.box_channels[-1] == 1).all())  # zoom 1 (the planned zoom would show the box edge)
    crop_lo = [int(np.floor(c - (p - 1) / 2 + 0.5)) for c, p in zip((23.5, 47.5, 47.5), PATCH)]
    expected = np.zeros((48, 96, 96), np.uint8)
    expected[tuple(slice(l, l + p) for l, p in zip(crop_lo, PATCH))] = 1
    assert np.array_equal(segs, expected)
    assert "device out of memory" in logs.text and "retrying at zoom 1 without autozoom" in logs.text


def test_out_of_memory_while_zooming_out_keeps_the_smaller_zoom(logs):
    # foreground everywhere touches the crop border: autozoom wants x1.5; that pass runs out
    # of memory; the zoom-1 result is kept without a further pass
    net = Stub(oom=lambda n, x: n == 2, everywhere=True)
    pred = Predictor(net, card(), "cpu", autozoom=True)
    segs = pred.predict(case_with((40, 80, 80), boxes=[box(18, 21, 38, 41, 38, 41)]))
    assert net.calls == 2
    expected = np.zeros((40, 80, 80), np.uint8)
    expected[12:28, 24:56, 24:56] = 1  # the zoom-1 crop around the box centre (19.5, 39.5, 39.5)
    assert np.array_equal(segs, expected)
    assert "keeping the smaller zoom" in logs.text


def test_out_of_memory_twice_retries_the_class_on_the_cpu(logs):
    """The CPU step of the ladder. On this CPU-only machine the predictor's own device is the CPU
    too, so the step is switched on by hand; the GPU test below runs it for real."""
    net = Stub(oom=lambda n, x: n <= 2)
    pred = Predictor(net, card(), "cpu", autozoom=True)
    pred.cpu_fallback = True
    segs = pred.predict(case_with((20, 40, 40), boxes=[box(5, 9, 10, 19, 10, 19), box(12, 15, 25, 30, 25, 30)]))
    assert net.calls == 4  # class 1: OOM, OOM, CPU pass; class 2: one pass
    assert (segs[5:10, 10:20, 10:20] == 1).all() and (segs[12:16, 25:31, 25:31] == 2).all()
    assert "retrying on the CPU" in logs.text


def test_out_of_memory_everywhere_keeps_the_previous_mask_and_spares_the_other_classes(logs):
    net = Stub(oom=lambda n, x: float(x[0, 2].sum()) == 500)  # class 1's box: 5 x 10 x 10 voxels
    pred = Predictor(net, card(), "cpu", autozoom=False)
    prev = np.zeros((20, 40, 40), np.uint8)
    prev[1:3, 1:3, 1:3] = 1
    segs = pred.predict(case_with((20, 40, 40), prev_pred=prev,
                                  boxes=[box(5, 9, 10, 19, 10, 19), box(5, 9, 10, 19, 25, 30)]))  # 500 and 300 voxels
    assert (segs[1:3, 1:3, 1:3] == 1).all() and int((segs == 1).sum()) == 8  # class 1: its previous mask
    assert (segs[5:10, 10:20, 25:31] == 2).all()
    assert "class 1: OutOfMemoryError" in logs.text


def test_out_of_memory_for_the_whole_case_reruns_it_on_the_cpu(logs, monkeypatch):
    real = infer.predictor.normalize_image
    calls = []

    def normalize_once_oom(imgs, device, **kw):
        calls.append(device)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (stub: the volume does not fit)")
        return real(imgs, device, **kw)

    monkeypatch.setattr(infer.predictor, "normalize_image", normalize_once_oom)
    net = Stub()
    pred = Predictor(net, card(), "cpu")
    pred.cpu_fallback = True
    segs = pred.predict(case_with((20, 40, 40), boxes=[box(5, 9, 10, 19, 10, 19)]))
    assert len(calls) == 2 and (segs[5:10, 10:20, 10:20] == 1).all()
    assert "whole case" in logs.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_out_of_memory_retries_on_the_cpu_for_real(logs):
    net = Stub(oom=lambda n, x: x.is_cuda)
    pred = Predictor(net, card(), "cuda", autozoom=False)
    segs = pred.predict(case_with((20, 40, 40), boxes=[box(5, 9, 10, 19, 10, 19)]))
    assert net.devices == ["cuda", "cuda", "cpu"]
    assert (segs[5:10, 10:20, 10:20] == 1).all()
    assert net.w.device.type == "cuda"  # moved back for the next class / case


# ---------------------------------------------------------------- slower than the budget
class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.mark.slow
def test_budget_guard_writes_every_case_in_time_with_a_slow_network(tmp_path, monkeypatch, logs):
    """Each pass takes 6 s of fake time and every prediction touches the crop border (autozoom
    would go to zoom 4: 5 passes per class, 30 s against a budget of 14 s per class). Every case
    is written before its budget (14 s x K, counted from process start for the first case, which
    also pays 3 s of model loading); six such stages stay under 90 s x K."""
    clock = FakeClock()
    net = Stub(everywhere=True, clock=clock, seconds=6.0)

    def from_path(path, device=None, **kw):
        clock.t += 3.0  # start-up
        return Predictor(net, card(), "cpu", **kw)

    monkeypatch.setattr(Predictor, "from_path", staticmethod(from_path))
    written = {}
    real_write = infer.writer.write_segs

    def recording_write(path, segs):
        written[os.path.basename(path)] = clock()
        real_write(path, segs)

    monkeypatch.setattr(infer.writer, "write_segs", recording_write)
    inp = tmp_path / "in"
    inp.mkdir()
    ks = {"a.npz": 1, "b.npz": 3, "c.npz": 2, "d.npz": 5, "e.npz": 1}
    for name, k in ks.items():
        boxes = [box(10 + 2 * i, 12 + 2 * i, 30, 40, 30 + 3 * i, 40 + 3 * i) for i in range(k)]
        np.savez(inp / name, imgs=np.random.default_rng(k).integers(0, 255, (40, 80, 80), dtype=np.uint8),
                 boxes=np.array(boxes, dtype=object))
    start = clock()
    assert main(["--inputs", str(inp), "--outputs", str(tmp_path / "out"), "--weights", "unused",
                 "--device", "cpu", "--seconds-per-class", "14"], clock=clock) == 4  # classes dropped: said
    assert sorted(written) == sorted(ks)
    t_prev = start
    for name in sorted(ks):
        budget = 14 * ks[name]
        assert written[name] - t_prev <= budget, (name, written[name] - t_prev, budget)
        assert 6 * (written[name] - t_prev) <= 90 * ks[name]
        t_prev = written[name]
        assert (tmp_path / "out" / name).exists()
    assert net.calls < 5 * sum(ks.values())  # the guard did drop work
    assert "time budget spent" in logs.text or "no time left" in logs.text
