"""infer.frame.Frame: the volume <-> working-frame bookkeeping, against hand-computed numbers."""
import torch

from infer.frame import Frame
from infer.geometry import Crop
from infer.prompts import ClassPrompts


def test_prompts_in_the_non_zero_frame():
    p = ClassPrompts(box=((0, 5, 5), (3, 10, 10)), extent=((0, 5, 5), (3, 10, 10)),
                     clicks=[(True, (6, 7, 8))])
    f = Frame((4, 2, 0), (10, 20, 20), (20, 30, 30), cropped=True).prompts(p)
    # z [0, 3) - 4 clips to nothing at the start: made [0, 1) as nnInteractive does
    assert f.box == ((0, 3, 5), (1, 8, 10)) and f.clicks == [(True, (2, 5, 8))]
    # past the frame's end: the start moves back by one, still empty -> no box
    frame = Frame.of_box(((0, 0, 0), (10, 10, 10)), (10, 10, 10))
    assert frame.prompts(ClassPrompts(box=((15, 0, 0), (18, 5, 5)))).box is None
    assert frame.prompts(ClassPrompts(box=((10, 0, 0), (18, 5, 5)))).box == ((9, 0, 0), (10, 5, 5))


def test_the_whole_volume_leaves_prompts_and_tensors_alone():
    p = ClassPrompts(box=((15, 0, 0), (18, 5, 5)))
    whole = Frame.whole((10, 10, 10))
    assert whole.prompts(p) is p and whole.is_whole
    t = torch.zeros(10, 10, 10)
    assert whole.cut(t) is t and whole.cut(None) is None


def test_crops_and_values_move_between_frame_and_volume():
    frame = Frame.of_box(((2, 3, 4), (8, 9, 10)), (12, 12, 12))
    assert frame.window == (slice(2, 8), slice(3, 9), slice(4, 10))
    crop = Crop(lo=(-1, 0, 1), size=(4, 4, 4), patch=(4, 4, 4))
    assert frame.to_volume(crop).lo == (1, 3, 5)
    vals = torch.arange(5 * 5 * 5, dtype=torch.float32).reshape(5, 5, 5)  # over [0, 5)^3 of the volume
    inner, flo, fhi = frame.inner(vals, (0, 0, 0), (5, 5, 5))
    assert (flo, fhi) == ([0, 0, 0], [3, 2, 1])  # volume [2, 5) x [3, 5) x [4, 5) in frame coordinates
    assert torch.equal(inner, vals[2:5, 3:5, 4:5])
    # a patch pasted from a frame crop lands where the crop lies in the volume
    pv, lo, hi = frame.paste(torch.ones(4, 4, 4), crop)
    assert (lo, hi) == ((1, 3, 5), (5, 7, 9)) and bool((pv == 1).all())
