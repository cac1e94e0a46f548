"""Training under torchrun (two CPU processes, gloo) and the data-loader path it uses.

The two-process run is ``python -m train`` launched by ``python -m torch.distributed.run
--standalone`` (localhost only) through tests/ddp_probe.py, which records what each rank writes
and its parameters after every step. Its reference is one process with the same global batch
(``--batch-size 4`` against 2 x 2) on the same data-loader path (``--workers 1``: a worker process).

Loss tolerance: both runs train on the same examples (one generator per example slot), so the
global loss of a step differs only by float32 summation order (two per-rank means averaged by an
all-reduce against one batch mean; gradients all-reduced against summed in one backward).
Measured here: identical at step 1, 5e-7 apart at step 2. The tolerance, 2e-5 absolute on
losses near 10.8 (~20 float32 ulps), is 250x smaller than what one optimizer step changes the
loss by (~5e-3) and than the gap between different examples, so a rank that trained on the wrong
share of the batch, or an update that was not the global batch's, fails it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts.synthetic import write_dataset
from train import __main__ as cli
from train.data import index_folder, load_folder
from train.loader import EpochSampler, ExampleSet, finish_batch, slot_rng

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (24, 48, 48)
LOSS_ATOL = 2e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp") / "data"
    write_dataset(folder, 3, seed=4, layout="train", shape=SHAPE)
    return folder


def _args(data, out, batch, epochs=2, workers=0):
    return ["--data", str(data), "--init", "scratch", "--config", "tiny", "--out", str(out),
            "--epochs", str(epochs), "--steps-per-epoch", "1", "--batch-size", str(batch),
            "--p-second", "1", "--p-zoom-out", "0.5", "--lr", "1e-3", "--seed", "5",
            "--workers", str(workers), "--threads", "1", "--no-progress"]


def _losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_sampler_shards_the_epoch_into_the_global_batches():
    n_ranks, batch, steps = 2, 3, 4
    shares = [list(EpochSampler(n_ranks * batch * steps, n_ranks, r)) for r in range(n_ranks)]
    for s in shares:
        s_epochs = {e for e, _ in s}
        assert s_epochs == {0}
    for i in range(steps):  # step i of all ranks = slots [i N b, (i + 1) N b)
        step = sorted(j for s in shares for _, j in s[i * batch:(i + 1) * batch])
        assert step == list(range(i * n_ranks * batch, (i + 1) * n_ranks * batch))
    sampler = EpochSampler(8, 2, 1)
    sampler.set_epoch(3)
    assert list(sampler) == [(3, 1), (3, 3), (3, 5), (3, 7)]


@pytest.mark.slow
def test_loader_examples_equal_the_trainers_own_simulation(data):
    """A slot built by the workers' path (finished there, or deferred to the trainer's model)
    is the example the trainer's simulation gives from the slot's generator."""
    from train.loop import Trainer
    net, card = cli.build_model("scratch", "tiny", 0, "3d", False, "test")
    tr = Trainer(net, card, load_folder(data), "/nonexistent-unused", steps_per_epoch=3,
                 batch_size=2, seed=5, device="cpu", progress=False, p_second=0.5, p_zoom_out=0.5)
    refs = index_folder(data)
    assert [r.name for r in refs] == [c.name for c in tr.cases]
    ds = ExampleSet(refs, tr.simulate, tr.sim, seed=5, n_slots=6)
    items = [ds[(1, j)] for j in range(6)]
    deferred = [it.x is None for it in items]
    assert any(deferred) and not all(deferred)  # both kinds occur with p_second = 0.5
    x, t = finish_batch(items, tr.simulate, tr.sim, 5, torch.device("cpu"))
    plan = ds.plan(1)
    for j in range(6):
        ci, label = plan[j]
        case = tr.cases[ci]
        ex = tr.simulate(tr.sim, case.imgs, case.gts == label, slot_rng(5, 1, j))
        torch.testing.assert_close(x[j], ex.x, rtol=0, atol=0)
        torch.testing.assert_close(t[j], ex.target, rtol=0, atol=0)


@pytest.mark.slow
def test_two_process_torchrun_training_matches_one_process_with_the_global_batch(data, tmp_path):
    out, probe = tmp_path / "ddp", tmp_path / "probe"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(ROOT / "tests" / "ddp_probe.py"), str(probe)] + _args(data, out, batch=2)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # both ranks finished
    assert (probe / "rank0_done").read_text() == "0" and (probe / "rank1_done").read_text() == "0"
    # parameters identical across ranks after every step (DDP averaged the gradients)
    for step in (1, 2):
        p0 = torch.load(probe / f"rank0_step{step}.pt", weights_only=True)
        p1 = torch.load(probe / f"rank1_step{step}.pt", weights_only=True)
        assert p0.keys() == p1.keys()
        for k in p0:
            assert torch.equal(p0[k], p1[k]), (step, k)
    init = cli.build_model("scratch", "tiny", 5, None, False, "x")[0].state_dict()
    assert not torch.equal(p0["decoder.seg_layers.2.weight"], init["decoder.seg_layers.2.weight"])
    # only rank 0 wrote checkpoints: two epochs and the final artifact, one log line per epoch
    assert (probe / "rank0_writes.txt").read_text().split() == \
        ["save_checkpoint", "save_checkpoint", "export_final"]
    assert not (probe / "rank1_writes.txt").exists()
    assert (out / "latest").read_text().strip() == "epoch_0002"
    assert (out / "final" / "weights.pt").is_file()
    final = torch.load(out / "final" / "weights.pt", weights_only=True)
    assert all(torch.equal(final[k], p0[k]) for k in p0)
    ddp_losses = _losses(out)
    assert len(ddp_losses) == 2

    # one process, same global batch (4), same data-loader path with a worker process
    single = tmp_path / "single"
    assert cli.main(_args(data, single, batch=4, workers=1)) == 0
    single_losses = _losses(single)
    np.testing.assert_allclose(ddp_losses, single_losses, rtol=0, atol=LOSS_ATOL)
    # the step changed the loss, by far more than the DDP-vs-single tolerance (about 1.3e-3 here)
    assert abs(single_losses[1] - single_losses[0]) > 20 * LOSS_ATOL
    # a process that trained on only its own half of the batch would be somewhere else
    half = tmp_path / "half"
    assert cli.main(_args(data, half, batch=2, epochs=1, workers=1)) == 0
    assert abs(_losses(half)[0] - single_losses[0]) > 100 * LOSS_ATOL
