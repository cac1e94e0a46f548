"""What a fine-tuning run leaves and says: checkpoint retention, the best-by-validation copy,
per-case validation lines, the --quick preset, the demo mark of a model fine-tuned from a demo
model (and build.sh's refusal of it), and Ctrl-C."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from infer.convert import write_artifact
from infer.weights import load_model, read_artifact
from scripts.synthetic import write_dataset
from train import __main__ as cli
from train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
from test_train import SHAPE, _cases  # the same two small generated cases

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(out, epochs, demo=True, **kw):
    net, card = cli.build_model("scratch", "tiny", 0, "3d", demo, "test")
    return Trainer(net, card, _cases(), out, epochs=epochs, steps_per_epoch=1, batch_size=2,
                   lr=1e-3, seed=3, device="cpu", progress=False, **kw)


def _epochs(out):
    return sorted(p.name for p in Path(out).glob("epoch_*"))


@pytest.mark.parametrize("keep, left", [(2, ["epoch_0004", "epoch_0005"]),
                                        (3, ["epoch_0003", "epoch_0004", "epoch_0005"]),
                                        (0, [f"epoch_000{i}" for i in range(1, 6)])])
def test_keep_sets_how_many_epoch_folders_stay(tmp_path, keep, left):
    _trainer(tmp_path, 5, keep=keep).fit()
    assert _epochs(tmp_path) == left
    assert (tmp_path / "latest").read_text().strip() == "epoch_0005"


def test_best_is_the_epoch_with_the_highest_validation_score(tmp_path, capsys):
    scores = iter([0.5, 0.7, 0.6, float("nan")])
    seen = {}  # epoch -> the weights validated at that epoch

    tr = _trainer(tmp_path, 4, keep=1)

    def validate(network, card, device, policy):
        seen[tr.epoch] = {k: v.detach().clone() for k, v in network.state_dict().items()}
        return {"val_final_dsc": next(scores), "val_box_dsc": 0.0}

    tr.validate = validate
    tr.fit()
    assert _epochs(tmp_path) == ["epoch_0004"]  # epoch 2's own folder is gone, its copy stays
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["epoch"] == 2 and best["metric"] == "val_final_dsc" and best["value"] == 0.7
    sd, card = read_artifact(tmp_path / "best")
    assert card.demo  # the run's card
    for k, v in seen[2].items():
        assert torch.equal(sd[k], v), k
    assert any(not torch.equal(sd[k], seen[4][k]) for k in sd)  # not simply the last epoch
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r.get("best", False) for r in log] == [True, True, False, False]
    assert log[3]["val_final_dsc"] is None  # NaN is written as null, never best
    out = capsys.readouterr().out
    assert f"best so far: epoch 2, val_final_dsc=0.7 -> {tmp_path / 'best'}" in out
    assert f"best stays epoch 2, val_final_dsc=0.7 ({tmp_path / 'best'})" in out

    # resumed with two more epochs: 0.65 does not beat the recorded 0.7, 0.9 does
    more = iter([0.65, 0.9])
    tr2 = _trainer(tmp_path, 6, keep=1, validate=lambda *model: {"val_final_dsc": next(more)})
    assert tr2.resume() and tr2.epoch == 4
    tr2.fit()
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert (best["epoch"], best["value"]) == (6, 0.9)


def test_best_metric_picks_another_number(tmp_path):
    vals = iter([(0.9, 0.1), (0.2, 0.8)])

    def validate(network, card, device, policy):
        final, box = next(vals)
        return {"val_final_dsc": final, "val_box_dsc": box}

    _trainer(tmp_path, 2, validate=validate, best_metric="val_box_dsc").fit()
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert (best["epoch"], best["metric"], best["value"]) == (2, "val_box_dsc", 0.8)


def test_quick_sets_defaults_that_flags_override(monkeypatch):
    got = {}

    def run(a, argv, ctx):  # stands in for the training: keeps the parsed options
        got["a"] = a
        return 0

    monkeypatch.setattr(cli, "_run", run)
    base = ["--data", "d", "--init", "scratch", "--out", "o", "--device", "cpu"]
    cli.main(base + ["--quick", "--epochs", "1"])
    a = got.pop("a")
    assert (a.epochs, a.steps_per_epoch, a.val_n, a.val_clicks, a.no_sim_autozoom) == (1, 40, 3, 1, True)
    cli.main(base)
    a = got.pop("a")
    assert (a.epochs, a.steps_per_epoch, a.val_n, a.val_clicks, a.no_sim_autozoom) == (10, 250, 6, 1, False)
    assert a.keep == 2 and a.best_metric == "val_final_dsc"


def _build_sh(weights, tmp_path, *flags):
    """build.sh with a fake docker first on PATH: it records its calls in tmp_path/docker.log and
    fails (build.sh then stops at 'Docker does not answer')."""
    fake = tmp_path / "bin"
    if not fake.exists():
        fake.mkdir()
        (fake / "docker").write_text(f'#!/bin/sh\necho "docker $*" >>"{tmp_path / "docker.log"}"\nexit 1\n')
        (fake / "docker").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", str(ROOT / "build.sh"), "--weights", str(weights), "--out",
                           str(tmp_path / "tar"), *flags], env=env, capture_output=True, text=True)


def test_a_model_fine_tuned_from_a_demo_model_stays_a_demo_model(tmp_path, capsys):
    data = tmp_path / "data"
    write_dataset(data, 2, seed=4, layout="train", shape=SHAPE)
    # a demo artifact, as weights/demo is: card "demo": true
    net, card = cli.build_model("scratch", "tiny", 0, "3d", True, "a demo")
    write_artifact(tmp_path / "demo_init", net.state_dict(), card)
    out = tmp_path / "ft"
    assert cli.main(["--data", str(data), "--init", str(tmp_path / "demo_init"), "--out", str(out),
                     "--epochs", "1", "--steps-per-epoch", "1", "--no-progress", "--device", "cpu"]) == 0
    assert "is a demo model" in capsys.readouterr().err
    assert load_model(out / "final", "cpu")[1].demo is True
    assert json.loads((out / "final" / "model_card.json").read_text())["demo"] is True
    # build.sh refuses it without --demo, before asking Docker anything
    res = _build_sh(out / "final", tmp_path)
    assert res.returncode == 1 and "holds the demo model" in res.stderr, res.stderr
    assert not (tmp_path / "docker.log").exists()
    # with --demo it goes on, to the (fake, failing) Docker
    res = _build_sh(out / "final", tmp_path, "--demo")
    assert res.returncode == 1 and "Docker does not answer" in res.stderr, res.stderr
    assert (tmp_path / "docker.log").read_text().startswith("docker info")

    # a model fine-tuned from a non-demo model is not marked, and build.sh takes it
    net, card = cli.build_model("scratch", "tiny", 0, "3d", False, "not a demo")
    write_artifact(tmp_path / "prod_init", net.state_dict(), card)
    out2 = tmp_path / "ft2"
    assert cli.main(["--data", str(data), "--init", str(tmp_path / "prod_init"), "--out", str(out2),
                     "--epochs", "1", "--steps-per-epoch", "1", "--no-progress", "--device", "cpu"]) == 0
    assert load_model(out2 / "final", "cpu")[1].demo is False
    res = _build_sh(out2 / "final", tmp_path)
    assert res.returncode == 1 and "Docker does not answer" in res.stderr, res.stderr


def test_validation_prints_one_line_per_case(tmp_path, capsys):
    data, val = tmp_path / "data", tmp_path / "val"
    write_dataset(data, 2, seed=4, layout="train", shape=SHAPE)
    write_dataset(val, 3, seed=5, layout="val", shape=SHAPE, no_box_every=3)
    out = tmp_path / "run"
    assert cli.main(["--data", str(data), "--init", "scratch", "--config", "tiny", "--out", str(out),
                     "--epochs", "1", "--steps-per-epoch", "1", "--val", str(val), "--val-n", "2",
                     "--no-progress", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("val ")]
    names = sorted(p.name for p in (val / "images").glob("*.npz"))[:2]
    # --val-n 2, one click (the defaults' stage count): box stage + click 1, two DSC each
    assert len(lines) == 2, err
    for i, (line, name) in enumerate(zip(lines, names), 1):
        assert line.startswith(f"val {i}/2 {name}: DSC "), line
        dscs = line.split(": DSC ")[1].split(" (")[0].split()
        assert len(dscs) == 2 and all(0 <= float(d) <= 1 for d in dscs), line
    assert f"best by val_final_dsc: {out}/best" in err
    assert (out / "best" / "best.json").is_file()


def test_interrupted_message_without_a_checkpoint(tmp_path):
    msg = cli.interrupted_message(tmp_path / "nothing")
    assert "before the first checkpoint" in msg and "\n" not in msg


@pytest.mark.slow
def test_ctrl_c_ends_with_one_line_and_status_130(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, 2, seed=4, layout="train", shape=SHAPE)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", "--data", str(data), "--init", "scratch", "--config", "tiny",
           "--out", str(out), "--epochs", "100000", "--steps-per-epoch", "2", "--threads", "1",
           "--device", "cpu"]
    # SIGINT at its default in the child even where this test runs with it ignored (a shell's
    # background job), so that Python turns it into KeyboardInterrupt
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not (out / "latest").is_file():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no checkpoint after 120 s"
            time.sleep(0.2)
        time.sleep(0.5)  # inside a later epoch, or writing its checkpoint
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr + stdout, stderr
    last = stderr.strip().splitlines()[-1]
    ckpt = (out / (out / "latest").read_text().strip())
    epoch = int(ckpt.name.split("_")[1])
    assert last == (f"python -m train: interrupted; last checkpoint {ckpt} (epoch {epoch}): run the "
                    f"same command again to resume from it"), stderr
    assert (ckpt / "train_state.pt").is_file() and (ckpt / "weights.pt").is_file()
    # the same command, with one epoch more, resumes from there
    argv = cmd[3:]
    argv[argv.index("--epochs") + 1] = str(epoch + 1)
    assert cli.main(argv) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["epoch"] == epoch + 1 and log[-1]["step"] == 2 * (epoch + 1)
    assert not math.isnan(log[-1]["loss"])
