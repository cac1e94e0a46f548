"""Sharded evaluation (``python -m evaluation --workers N``): the merged report equals one worker's.

Rows are compared on every column but the timing ones (``TotalRunningTime``, ``RunningTime_k``):
same cases, same order, same scores, flags and notes, written as the same text.
"""
import csv
import os
import sys
from pathlib import Path

import pytest

from evaluation import shard as sharding
from evaluation.__main__ import main
from scripts.synthetic import write_dataset

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"TotalRunningTime"} | {f"RunningTime_{k}" for k in range(1, 7)}

STUB = '''import os, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, {repo!r})
from infer.npz import read_case
from infer.writer import write_segs

for p in sorted(Path(os.environ["INFER_INPUTS"]).glob("*.npz")):
    case = read_case(p)
    segs = np.zeros(case["imgs"].shape, np.uint8) if case["prev_pred"] is None else case["prev_pred"].copy()
    if case["prev_pred"] is None:  # box stage: fill each box on its z range
        for k, b in enumerate(case["boxes"] or []):
            segs[b["z_min"]:b["z_max"] + 1, b["z_mid_y_min"]:b["z_mid_y_max"] + 1,
                 b["z_mid_x_min"]:b["z_mid_x_max"] + 1] = k + 1
    for k, order in enumerate(case["clicks_order"] or []):  # paint / erase a cube at each click
        if order and order[-1] is not None:
            z, y, x = case["clicks"][k][order[-1]][-1]
            sl = tuple(slice(max(c - 2, 0), c + 3) for c in (z, y, x))
            segs[sl] = k + 1 if order[-1] == "fg" else 0
    write_segs(Path(os.environ["INFER_OUTPUTS"]) / p.name, segs)
'''


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    write_dataset(root / "val", 4, seed=11, layout="val", shape=(20, 40, 40), no_box_every=3)
    return root / "val"


def _rows(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def _shares(out, n):
    import json
    return [json.loads(sharding.shard_file(out, i, n).read_text())["cases"] for i in range(n)]


@pytest.mark.slow
def test_cold_mode_two_workers_and_merged_shards_equal_one_worker(cases, tmp_path, monkeypatch):
    (tmp_path / "stub.py").write_text(STUB.format(repo=str(ROOT)))
    (tmp_path / "predict.sh").write_text(f'exec "{sys.executable}" "{tmp_path / "stub.py"}"\n')
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    common = ["--images", str(cases / "images"), "--gts", str(cases / "gts"),
              "--predict-sh", str(tmp_path / "predict.sh")]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    one = _rows(tmp_path / "one" / "metrics.csv")
    names = sorted(p.name for p in (cases / "images").glob("*.npz"))
    assert [r["CaseName"] for r in one] == names and len(names) == 4
    assert {r["HasBoxes"] for r in one} == {"True", "False"}
    assert len({r["DSC_AUC"] for r in one}) > 1  # the cases score differently

    # --workers 2: two worker processes, each its own share, merged back in name order
    two = tmp_path / "two"
    assert main(common + ["--out", str(two), "--workers", "2"]) == 0
    assert _shares(two, 2) == [names[0::2], names[1::2]]
    assert _rows(two / "metrics.csv") == one
    assert (two / "report.png").stat().st_size > 10_000

    # each worker's own CSV holds its share's rows
    assert _rows(sharding.shard_file(two, 1, 2, ".csv")) == [one[1], one[3]]

    # several machines: the workers above were `--shard I/2` runs; --merge-shards rebuilds the report
    (two / "metrics.csv").unlink()
    merge = ["--images", str(cases / "images"), "--out", str(two), "--merge-shards", "2"]
    assert main(merge) == 0
    assert _rows(two / "metrics.csv") == one
    # a missing share is reported (exit 1), not silently dropped
    sharding.shard_file(two, 1, 2).unlink()
    assert main(merge) == 1
    assert [r["CaseName"] for r in _rows(two / "metrics.csv")] == names[0::2]


@pytest.mark.slow
def test_warm_mode_two_workers_equal_one_worker(cases, tmp_path, monkeypatch):
    import torch
    from tests.tinymodel import make_artifact
    weights = make_artifact(tmp_path / "tiny", seed=3)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run with OMP_NUM_THREADS=1: same kernels, same sums
    try:
        common = ["--images", str(cases / "images"), "--gts", str(cases / "gts"), "--warm",
                  "--weights", str(weights), "--device", "cpu", "--limit", "3"]
        assert main(common + ["--out", str(tmp_path / "one")]) == 0
        assert main(common + ["--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    finally:
        torch.set_num_threads(n)
    one = _rows(tmp_path / "one" / "metrics.csv")
    assert len(one) == 3 and len({r["DSC_1"] for r in one}) > 1
    assert _shares(tmp_path / "two", 2) == [[one[0]["CaseName"], one[2]["CaseName"]],
                                            [one[1]["CaseName"]]]
    assert _rows(tmp_path / "two" / "metrics.csv") == one


def test_each_worker_gets_its_own_gpu_or_its_share_of_the_cpu(monkeypatch):
    base = {"PATH": "/bin"}
    envs = [sharding.worker_env(i, 3, ["2", "5"], "warm", base) for i in range(3)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "5", "2"]
    assert all(e["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT) for e in envs)
    cpu = sharding.worker_env(0, 2, [], "cold", base)
    assert "CUDA_VISIBLE_DEVICES" not in cpu
    assert cpu["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    # docker mode: the container gets the GPU through --gpus device=<id>
    cmd = sharding.worker_args(["--images", "x", "--docker", "t.tar.gz"], 1, 2, ["2", "5"],
                               "docker", "t:latest", True)
    assert cmd[cmd.index("--docker-gpu-device") + 1] == "5"
    assert cmd[len(cmd) - cmd[::-1].index("--docker")] == "t:latest"  # the last --docker wins
    assert cmd[cmd.index("--shard") + 1] == "1/2" and cmd[cmd.index("--workers") + 1] == "1"
    from evaluation.docker_runner import docker_command
    assert "device=5" in docker_command("t:latest", "/in", "/out", True, gpu_device="5")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,7")
    assert sharding.visible_gpus(None) == ["3", "7"] and sharding.visible_gpus("cpu") == []
