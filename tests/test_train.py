"""Fine-tuning: a step learns, resume is exact, the prompt simulation clicks where the harness would."""
import json

import cc3d
import numpy as np
import pytest
import torch
from torch import nn

from infer.card import DEFAULT_CHANNELS, ModelCard
from infer.interaction import first_view
from infer.weights import load_model
from scripts.synthetic import generate_case
from train import __main__ as cli
from train.checkpoint import latest_checkpoint, load_checkpoint
from train.configs import get_config
from train.data import Case
from train.loop import Trainer
from train.simulate import SimModel, simulate_example

SHAPE = (24, 48, 48)


pytestmark = pytest.mark.usefixtures("one_thread")


def _cases(n=2, seed=7):
    out = []
    for i in range(n):
        c = generate_case(np.random.default_rng([seed, i]), shape=SHAPE, n_classes=2,
                          kinds=["blob", "ellipsoid"])
        out.append(Case(f"c{i}.npz", c["imgs"], c["gts"], tuple(c["spacing"]), (1, 2)))
    return out


def _tiny(seed=0, box_style="3d"):
    cfg = get_config("tiny")
    torch.manual_seed(seed)
    net, card = cli.build_model("scratch", "tiny", seed, box_style, True, "test")
    assert list(card.patch_size) == cfg["patch_size"]
    return net, card


def _trainer(out, seed_net=0, epochs=2, steps=2, **kw):
    net, card = _tiny(seed_net)
    return Trainer(net, card, _cases(), out, epochs=epochs, steps_per_epoch=steps, batch_size=2,
                   lr=1e-3, seed=3, device="cpu", progress=False, **kw)


def _params(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    tr = _trainer("/nonexistent-unused", steps=1)
    rng = np.random.default_rng(0)
    x, t = tr.make_batch([(0, 1), (1, 2)], rng)
    assert x.shape == (2, len(DEFAULT_CHANNELS), 16, 32, 32) and t.shape == (2, 16, 32, 32)
    assert 0 < float(t.mean()) < 1
    losses = [tr.train_step(x, t) for _ in range(12)]
    # 10 x Dice + CE starts near 10 + ln 2; twelve AdamW steps at 1e-3 take off well over 0.2
    assert losses[-1] < losses[0] - 0.2, losses
    assert losses[-1] < min(losses[:3]), losses
    assert tr.step == 12


def test_resume_after_an_interrupted_epoch_matches_an_uninterrupted_run(tmp_path):
    # uninterrupted: 2 epochs of 2 steps
    a = _trainer(tmp_path / "a")
    a.fit()
    ref = _params(a.network)

    # interrupted in the middle of epoch 2 (after its first step)
    b = _trainer(tmp_path / "b")

    def crash(epoch, i):
        if epoch == 1 and i == 0:
            raise KeyboardInterrupt

    b.after_step = crash
    with pytest.raises(KeyboardInterrupt):
        b.fit()
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt is not None and ckpt.name == "epoch_0001"
    assert not (tmp_path / "b" / "final").exists()
    _, _, state = load_checkpoint(ckpt)
    assert state["epoch"] == 1 and state["step"] == 2

    # a fresh process: another initialisation, then resume
    c = _trainer(tmp_path / "b", seed_net=99)
    assert not torch.equal(c.network.state_dict()["decoder.seg_layers.2.weight"],
                           ref["decoder.seg_layers.2.weight"])
    assert c.resume()
    assert (c.epoch, c.step) == (1, 2)
    saved = state["optimizer"]["state"]
    loaded = c.optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys() and len(saved) > 0
    for k in saved:
        assert torch.equal(saved[k]["exp_avg_sq"], loaded[k]["exp_avg_sq"])
    final = c.fit()
    assert (c.epoch, c.step) == (2, 4)
    got = _params(c.network)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=k)
    # the exported artifact is what infer loads
    net, card = load_model(final, "cpu")
    assert card.demo is True and card.box_style == "3d"
    torch.testing.assert_close(net.state_dict()["decoder.seg_layers.2.weight"],
                               ref["decoder.seg_layers.2.weight"], rtol=0, atol=0)


class _ChannelStub(nn.Module):
    """Predicts 'object' exactly where input channel ``ch`` is > 0.05 (patch space)."""

    def __init__(self, ch):
        super().__init__()
        self.ch = ch
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        m = (x[:, self.ch:self.ch + 1] > 0.05).float() * 20 - 10 + self.w
        return torch.cat([-m, m], 1)


def _stub_model(ch, box_style="3d"):
    net, card = _tiny(box_style=box_style)
    return SimModel.of(_ChannelStub(ch), card, torch.device("cpu"))


def _largest_component(mask):
    lab = cc3d.connected_components(mask.astype(np.uint8), connectivity=26)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == np.argmax(sizes)


def test_simulated_click_lies_in_the_largest_error_component_fg_bg_by_truth():
    # truth: a wide slab on z 4..8 and a narrower one on z 9..15 -> the 3D box drawn from z_mid's
    # 2D box over-covers (bg error) or under-covers (fg error) depending on where z_mid falls
    gt = np.zeros(SHAPE, dtype=bool)
    gt[4:9, 10:30, 10:30] = True
    gt[9:16, 14:22, 14:22] = True
    imgs = (gt * 150 + 40).astype(np.uint8)
    kinds = set()
    for seed in range(4):
        # box first, then the stub "network" answers with its box channel (index 2)
        ex = simulate_example(_stub_model(2), imgs, gt, np.random.default_rng(seed),
                              p_box=1.0, p_second=1.0)
        assert ex.first == "box" and ex.click is not None and ex.first_pred is not None
        error = ex.first_pred != gt
        comp = _largest_component(error)
        z, y, x = ex.click.zyx
        assert comp[z, y, x], "click outside the largest error component"
        assert ex.click.kind == ("fg" if gt[z, y, x] else "bg")
        kinds.add(ex.click.kind)
        # it is the centre of that component: no voxel of it is farther from its border
        from scipy import ndimage
        d = ndimage.distance_transform_edt(np.pad(comp, 1))[1:-1, 1:-1, 1:-1]
        assert d[z, y, x] == d[comp].max()
        # the second step's prompts: the new click last, the previous mask = the first prediction
        assert ex.prompts.clicks[-1] == (ex.click.kind == "fg", (z, y, x))
        # the crop is centred on the new click (the predictor's click-stage rule)
        centre = [l + (s - 1) / 2 for l, s in zip(ex.crop.lo, ex.crop.size)]
        assert all(abs(c - p) <= 0.5 for c, p in zip(centre, (z, y, x)))
        assert float(ex.x[1].max()) > 0.5  # previous-mask channel is filled
        assert float(ex.x[4 if ex.click.kind == "fg" else 5].max()) > 0.5  # the new point
    assert kinds  # at least one kind seen


def test_click_first_then_fg_click_from_a_point_stub():
    gt = np.zeros(SHAPE, dtype=bool)
    gt[6:18, 8:40, 8:40] = True  # far bigger than a click ball
    imgs = (gt * 150 + 40).astype(np.uint8)
    ex = simulate_example(_stub_model(4), imgs, gt, np.random.default_rng(0), p_box=0.0,
                          p_second=1.0)
    assert ex.first == "click"
    first_click = ex.prompts.clicks[0]
    assert first_click[0] is True and gt[first_click[1]]  # from the empty prediction: foreground
    assert ex.first_pred.any() and (ex.first_pred <= gt).all()  # the stub drew a ball inside gt
    comp = _largest_component(ex.first_pred != gt)
    assert ex.click.kind == "fg" and comp[ex.click.zyx]
    assert len(ex.prompts.clicks) == 2


def test_without_second_step_the_example_is_the_first_interaction():
    gt = np.zeros(SHAPE, dtype=bool)
    gt[6:18, 8:30, 8:30] = True
    imgs = (gt * 150 + 40).astype(np.uint8)
    ex = simulate_example(_stub_model(2), imgs, gt, np.random.default_rng(1), p_box=1.0,
                          p_second=0.0)
    assert ex.click is None and ex.first_pred is None and not ex.prompts.clicks
    assert float(ex.x[1].abs().max()) == 0  # no previous mask
    assert float(ex.x[2].max()) > 0.5       # the box
    # the target is the truth on the crop
    assert float(ex.target.sum()) > 0 and set(torch.unique(ex.target).tolist()) <= {0.0, 1.0}


def test_cli_trains_exports_and_resumes(tmp_path, capsys):
    from scripts.synthetic import write_dataset
    data = tmp_path / "data"
    write_dataset(data, 2, seed=4, layout="train", shape=SHAPE)
    val = tmp_path / "val"
    write_dataset(val, 1, seed=5, layout="val", shape=SHAPE)
    out = tmp_path / "run"
    args = ["--data", str(data), "--init", "scratch", "--out", str(out), "--config", "tiny",
            "--epochs", "1", "--steps-per-epoch", "1", "--val", str(val), "--val-clicks", "1",
            "--no-progress", "--demo"]
    assert cli.main(args) == 0
    net, card = load_model(out / "final", "cpu")
    assert card.demo and list(card.patch_size) == get_config("tiny")["patch_size"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["epoch"] == 1 and "val_box_dsc" in log[0] and "loss" in log[0]
    # --no-progress hides the bar, not the epoch's line
    assert any(line.startswith("epoch=1 step=1 loss=") for line in capsys.readouterr().out.splitlines())
    # one more epoch: resumes from epoch 1, does not restart
    args[args.index("--epochs") + 1] = "2"
    assert cli.main(args) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and log[1]["step"] == 2
    # the card names both commands: the first run's and the one that resumed it
    source = load_model(out / "final", "cpu")[1].source
    assert source.startswith("trained with `python -m train --data") and "--epochs 1 " in source
    assert "; resumed after epoch 1 with `python -m train --data" in source and "--epochs 2 " in source
    # fine-tuning from the exported artifact works too
    out2 = tmp_path / "ft"
    assert cli.main(["--data", str(data), "--init", str(out / "final"), "--out", str(out2),
                     "--epochs", "1", "--steps-per-epoch", "1", "--no-progress"]) == 0
    assert (out2 / "final" / "weights.pt").is_file()


def test_zoomed_out_training_crop_is_the_autozoom_crop():
    from infer.geometry import make_crop
    from train.simulate import training_crop
    gt = np.zeros(SHAPE, dtype=bool)
    gt[6:18, 8:30, 8:30] = True
    imgs = (gt * 150 + 40).astype(np.uint8)
    pred = _stub_model(2)
    pol, patch = pred.policy, pred.engine.patch
    ex = simulate_example(pred, imgs, gt, np.random.default_rng(1), p_box=1.0, p_second=0.0)
    # the box's extent (12, 22, 22) on the tiny patch (16, 32, 32): centre (11.5, 18.5, 18.5),
    # zoom max((12 + 16/3) / 16, (22 + 32/3) / 32) = 1.0833 (hand-computed)
    center, zoom = first_view(pol, ex.prompts, None, patch)
    assert center == [11.5, 18.5, 18.5] and zoom == pytest.approx((12 + 16 / 3) / 16)
    first = training_crop(pol, patch, ex.prompts, None, 0)
    assert first == make_crop(center, zoom, patch) == ex.crop
    # one step: x1.5 of the crop's largest actual scale (y, x: round(32 * 1.0833) = 35 -> 35/32)
    one = training_crop(pol, patch, ex.prompts, None, 1)
    assert first.size == (17, 35, 35)
    assert one == make_crop(center, 35 / 32 * 1.5, patch)
    two = training_crop(pol, patch, ex.prompts, None, 2)
    assert max(two.scale) > max(one.scale) > max(first.scale)
    # with p_zoom_out = 1 the example is sampled on a zoomed-out crop
    ex2 = simulate_example(pred, imgs, gt, np.random.default_rng(1), p_box=1.0, p_second=0.0,
                           p_zoom_out=1.0)
    assert ex2.crop in (one, two)


def test_examples_without_the_network_need_no_engine():
    """A first-interaction example is built from the card and policy alone (as the data-loader
    workers do); one with a second step asks for the network."""
    from train.simulate import ModelNeeded
    gt = np.zeros(SHAPE, dtype=bool)
    gt[6:18, 8:30, 8:30] = True
    imgs = (gt * 150 + 40).astype(np.uint8)
    pred = _stub_model(2)
    with_net = simulate_example(pred, imgs, gt, np.random.default_rng(3), p_box=1.0, p_second=0.0)
    without = simulate_example(pred.without_network(), imgs, gt, np.random.default_rng(3), p_box=1.0,
                               p_second=0.0)
    assert without.crop == with_net.crop
    assert torch.equal(without.x, with_net.x) and torch.equal(without.target, with_net.target)
    with pytest.raises(ModelNeeded):
        simulate_example(pred.without_network(), imgs, gt, np.random.default_rng(3), p_box=1.0,
                         p_second=1.0)


def test_refinement_example_uses_the_coarse_prediction_on_a_zoom_1_tile():
    # an object larger than the tiny patch (16, 32, 32): the first crop is zoomed out
    gt = np.zeros(SHAPE, dtype=bool)
    gt[2:22, 4:44, 4:44] = True
    imgs = (gt * 150 + 40).astype(np.uint8)
    pred = _stub_model(2)
    seen = 0
    for seed in range(6):
        ex = simulate_example(pred, imgs, gt, np.random.default_rng(seed), p_box=1.0,
                              p_second=0.0, p_refine=1.0)
        assert first_view(pred.policy, ex.prompts, None, pred.engine.patch)[1] > 1  # the first crop is zoomed out
        assert ex.click is None and ex.first_pred is not None
        assert ex.crop.scale == (1.0, 1.0, 1.0)  # full resolution
        # the tile overlaps the coarse prediction's bounding box, inside it where it is longer
        nz = np.nonzero(ex.first_pred)
        for a in range(3):
            lo, hi = int(nz[a].min()), int(nz[a].max()) + 1
            if hi - lo >= ex.crop.size[a]:
                assert lo <= ex.crop.lo[a] and ex.crop.hi[a] <= hi
        # previous-mask channel = the coarse prediction on that tile
        sl = tuple(slice(max(l, 0), h) for l, h in zip(ex.crop.lo, ex.crop.hi))
        inner = ex.first_pred[sl].astype(np.float32)
        got = ex.x[1][tuple(slice(0, s) for s in inner.shape)].numpy()
        np.testing.assert_allclose(got, inner, atol=1e-6)
        seen += 1
    assert seen == 6
