"""scripts/paired.py: paired per-case differences and their bootstrap interval, by hand."""
from scripts.paired import bootstrap_mean_ci, compare, main


def _csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("CaseName,DSC_Final,Notes\n" + "".join(f"{c},{v},x\n" for c, v in rows))
    return path


def test_constant_differences_have_a_point_interval():
    assert all(abs(v - 0.1) < 1e-12 for v in bootstrap_mean_ci([0.1, 0.1, 0.1], resamples=200))


def test_interval_of_zero_zero_one():
    # resampling (0, 0, 1): all zeros with probability 8/27 > 2.5 %, all ones 1/27 = 3.7 % > 2.5 %
    lo, hi = bootstrap_mean_ci([0.0, 0.0, 1.0], resamples=20000, seed=1)
    assert lo == 0.0 and hi == 1.0


def test_compare_pairs_by_case_name_and_counts(tmp_path):
    base = {"a": {"DSC_Final": 0.5}, "b": {"DSC_Final": 0.5}, "c": {"DSC_Final": 0.5}}
    other = {"b": {"DSC_Final": 0.7}, "c": {"DSC_Final": 0.5}, "d": {"DSC_Final": 0.0}}
    r = compare(base, other, "DSC_Final")
    assert r["n"] == 2 and abs(r["mean"] - 0.1) < 1e-12
    assert (r["better"], r["worse"], r["equal"]) == (1, 0, 1)


def test_main_on_an_ablation_folder(tmp_path, capsys):
    _csv(tmp_path / "abl" / "default" / "metrics.csv", [("a", 0.5), ("b", 0.6)])
    _csv(tmp_path / "abl" / "other" / "metrics.csv", [("a", 0.4), ("b", 0.4)])
    assert main(["--ablation", str(tmp_path / "abl"), "--metric", "DSC_Final"]) == 0
    out = capsys.readouterr().out
    # differences -0.1 and -0.2: mean -0.15, interval [-0.2, -0.1]
    assert "| other | DSC_Final | 2 | -0.1500 | [-0.2000, -0.1000] | 0 / 2 / 0 |" in out
