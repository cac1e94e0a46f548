"""infer.session: the cases it builds (against hand-written dicts), undo, and its results against
Predictor.predict on the same case written as the organizer writes it."""
import numpy as np
import pytest

from infer.npz import read_case
from infer.predictor import Predictor
from infer.session import Session, box_to_dict

SHAPE = (10, 16, 16)
SPACING = (2.0, 1.0, 1.0)


class Recorder:
    """Stands in for a Predictor: records each case and answers a different random label map."""

    def __init__(self, labels=3):
        self.cases, self.rng, self.labels = [], np.random.default_rng(0), labels

    def predict(self, case):
        self.cases.append(case)
        return self.rng.integers(0, self.labels, case["imgs"].shape).astype(np.uint8)


def assert_case(case, expected):
    """``case`` equals ``expected``: the same keys, arrays compared by value."""
    assert sorted(case) == sorted(expected)
    for key, want in expected.items():
        if isinstance(want, np.ndarray):
            assert isinstance(case[key], np.ndarray) and np.array_equal(case[key], want), key
        else:
            assert case[key] == want, key


@pytest.fixture
def imgs():
    return np.arange(np.prod(SHAPE), dtype=np.int64).reshape(SHAPE).astype(np.uint8)


BOX = {"z_min": 2, "z_max": 5, "z_mid": 3, "z_mid_y_min": 3, "z_mid_y_max": 8,
       "z_mid_x_min": 4, "z_mid_x_max": 9}


def test_simple_box_is_half_open_and_its_z_mid_the_middle_slice():
    assert box_to_dict([[2, 6], [3, 9], [4, 10]]) == BOX
    assert box_to_dict([[2, 5], [0, 1], [0, 1]])["z_mid"] == 3  # slices 2, 3, 4
    assert box_to_dict(dict(BOX)) == BOX
    for bad in ([[2, 2], [3, 9], [4, 10]], [[0, 1], [0, 1]], {**BOX, "z_mid": 7},
                {k: v for k, v in BOX.items() if k != "z_mid"}, {**BOX, "extra": 1}, [[0, 1.5], [0, 1], [0, 1]]):
        with pytest.raises(ValueError):
            box_to_dict(bad)
    with pytest.raises(ValueError):
        box_to_dict([[20, 30], [0, 4], [0, 4]], SHAPE)  # beyond z = 9


def test_box_then_clicks_give_the_organizers_stages(imgs):
    rec = Recorder()
    s = Session(rec)
    s.set_image(imgs, spacing=SPACING)
    s.add_box([[2, 6], [3, 9], [4, 10]])
    base = {"name": "session", "warnings": [], "imgs": imgs, "spacing": SPACING}
    assert_case(rec.cases[0], {**base, "boxes": [BOX]})  # the box stage: no clicks, no prev_pred
    first = s.mask
    s.add_click((3, 5, 6))
    third = s.add_click([4, 7, 7], positive=False)
    s.add_click((3, 6, 6))
    assert_case(rec.cases[1], {**base, "boxes": [BOX], "clicks": [{"fg": [[3, 5, 6]], "bg": []}],
                               "clicks_order": [["fg"]], "prev_pred": first})
    assert_case(rec.cases[3], {**base, "boxes": [BOX],
                               "clicks": [{"fg": [[3, 5, 6], [3, 6, 6]], "bg": [[4, 7, 7]]}],
                               "clicks_order": [["fg", "bg", "fg"]], "prev_pred": third})


def test_clicks_without_a_box_and_an_organizer_box_dict(imgs):
    rec = Recorder()
    s = Session(rec)
    s.set_image(imgs)
    s.add_click((0, 0, 0), positive=False)
    assert_case(rec.cases[0], {"name": "session", "warnings": [], "imgs": imgs, "spacing": None,
                               "clicks": [{"fg": [], "bg": [[0, 0, 0]]}], "clicks_order": [["bg"]]})
    s.reset()
    s.add_box(dict(BOX))
    assert rec.cases[1]["boxes"] == [BOX] and "clicks" not in rec.cases[1] and "prev_pred" not in rec.cases[1]
    with pytest.raises(ValueError):
        s.add_click((10, 0, 0))  # z = 10 is outside the 10 slices
    s.add_click((1, 1, 1))
    with pytest.raises(ValueError):
        s.add_box(BOX)  # a box after a click
    assert len(rec.cases) == 3


def test_other_objects_are_marked_done_for_this_interaction_only(imgs):
    rec = Recorder()
    s = Session(rec)
    s.set_image(imgs, SPACING)
    s.add_box([[2, 6], [3, 9], [4, 10]])
    s.add_click((3, 5, 6), positive=False)
    assert s.new_object() == 2 and s.object_id == 2
    before = s.mask
    s.add_click((7, 12, 12))
    assert_case(rec.cases[2], {"name": "session", "warnings": [], "imgs": imgs, "spacing": SPACING,
                               "boxes": [BOX, {}],
                               "clicks": [{"fg": [], "bg": [[3, 5, 6]]}, {"fg": [[7, 12, 12]], "bg": []}],
                               "clicks_order": [["bg", None], ["fg"]], "prev_pred": before})
    s.select_object(1)
    s.add_click((4, 5, 5))
    assert rec.cases[3]["clicks_order"] == [["bg", "fg"], ["fg", None]]
    assert rec.cases[3]["clicks"] == [{"fg": [[4, 5, 5]], "bg": [[3, 5, 6]]}, {"fg": [[7, 12, 12]], "bg": []}]
    # a new object with nothing yet: a box stage for it alone, the others kept
    assert s.new_object() == 3
    s.add_box([[0, 2], [0, 3], [0, 4]])
    box3 = {"z_min": 0, "z_max": 1, "z_mid": 0, "z_mid_y_min": 0, "z_mid_y_max": 2, "z_mid_x_min": 0, "z_mid_x_max": 3}
    assert rec.cases[4]["boxes"] == [BOX, {}, box3]
    assert rec.cases[4]["clicks_order"] == [["bg", "fg", None], ["fg", None], []]


def test_undo_restores_the_previous_mask_exactly_and_reset_clears(imgs):
    rec = Recorder(labels=4)
    s = Session(rec)
    s.set_image(imgs, SPACING)
    with pytest.raises(ValueError):
        s.undo()
    masks = [s.add_box([[2, 6], [3, 9], [4, 10]])]
    masks.append(s.add_click((3, 5, 6)))
    masks.append(s.add_click((3, 8, 8), positive=False))
    assert not np.array_equal(masks[1], masks[2])
    assert np.array_equal(s.undo(), masks[1]) and np.array_equal(s.mask, masks[1])
    # the prompts went back too: the next click is the second of the object, not the third
    s.add_click((4, 4, 4))
    assert rec.cases[-1]["clicks"] == [{"fg": [[3, 5, 6], [4, 4, 4]], "bg": []}]
    assert rec.cases[-1]["clicks_order"] == [["fg", "fg"]]
    assert np.array_equal(rec.cases[-1]["prev_pred"], masks[1])
    s.undo()
    s.undo()
    assert np.array_equal(s.mask, masks[0])
    assert s.undo().max() == 0  # before the first interaction: no mask yet
    s.add_click((1, 1, 1))
    s.new_object()
    s.reset()
    assert s.n_objects == 1 and s.object_id == 1 and s.mask.max() == 0
    with pytest.raises(ValueError):
        s.undo()


def test_mask_is_a_copy_and_a_failed_prediction_changes_nothing(imgs):
    class Failing(Recorder):
        fail = False

        def predict(self, case):
            if self.fail:
                raise RuntimeError("boom")
            return super().predict(case)

    rec = Failing()
    s = Session(rec)
    s.set_image(imgs)
    m = s.add_click((2, 2, 2))
    s.mask[:] = 9
    assert np.array_equal(s.mask, m)
    rec.fail = True
    with pytest.raises(RuntimeError):
        s.add_click((3, 3, 3), positive=False)
    assert s.case()["clicks"] == [{"fg": [[2, 2, 2]], "bg": []}]
    assert np.array_equal(s.mask, m)


@pytest.fixture(scope="module")
def demo():
    return Predictor.from_path("weights/demo", device="cpu")


def test_results_equal_predictor_on_the_same_case_written_as_the_organizer_does(demo, tmp_path):
    """Box, then a background and a foreground click on a bright ball, then a second object:
    each mask equals ``Predictor.predict`` on a case written with ``np.savez`` in the organizer's
    layout and read back with ``read_case``."""
    z, y, x = np.ogrid[:24, :40, :40]
    ball = (z - 12) ** 2 + (y - 18) ** 2 + (x - 20) ** 2 <= 36
    cube = (z >= 4) & (z < 9) & (y >= 30) & (y < 36) & (x >= 5) & (x < 11)
    rng = np.random.default_rng(1)
    imgs = np.clip(40 + 150 * ball + 100 * cube + rng.normal(0, 10, ball.shape), 0, 255).astype(np.uint8)
    spacing = np.array([2.0, 1.0, 1.0])
    box = {"z_min": 6, "z_max": 18, "z_mid": 12, "z_mid_y_min": 12, "z_mid_y_max": 24,
           "z_mid_x_min": 14, "z_mid_x_max": 26}

    def organizer(name, **keys):
        path = tmp_path / f"{name}.npz"
        np.savez(path, imgs=imgs, spacing=spacing, **keys)
        return demo.predict(read_case(path))

    s = Session(demo)
    s.set_image(imgs, spacing)
    got = [s.add_box([[6, 19], [12, 25], [14, 27]])]
    got.append(s.add_click((12, 18, 27), positive=False))
    got.append(s.add_click((12, 20, 20)))
    s.new_object()
    got.append(s.add_click((6, 33, 8)))

    want = [organizer("box", boxes=[box])]
    want.append(organizer("c1", boxes=[box], clicks=[{"fg": [], "bg": [[12, 18, 27]]}], clicks_order=[["bg"]],
                          prev_pred=want[0]))
    want.append(organizer("c2", boxes=[box], clicks=[{"fg": [[12, 20, 20]], "bg": [[12, 18, 27]]}],
                          clicks_order=[["bg", "fg"]], prev_pred=want[1]))
    order = np.empty(2, object)
    order[:] = [["bg", "fg", None], ["fg"]]
    want.append(organizer("o2", boxes=[box, {}], clicks=[{"fg": [[12, 20, 20]], "bg": [[12, 18, 27]]},
                                                         {"fg": [[6, 33, 8]], "bg": []}],
                          clicks_order=order, prev_pred=want[2]))
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == imgs.shape and np.array_equal(g, w), f"interaction {i}"
    assert (got[0] == 1).sum() > 50  # the box found the ball: the comparison is not of empty masks
    assert np.array_equal(got[3][got[2] == 1], got[2][got[2] == 1])  # object 1 kept by object 2's click
    assert np.array_equal(s.undo(), want[2])
