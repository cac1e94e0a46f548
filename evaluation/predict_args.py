"""Predictor options for an evaluation run: ``python -m infer`` flags, passed through.

``python -m evaluation ... --predict-arg=--no-refine --predict-arg="--policy reference"``: each
value is split like a shell word list (``shlex``) and the tokens are, in order,

- cold mode: appended to ``sh predict.sh`` (which hands them to ``python -m infer``);
- warm mode: parsed by ``python -m infer``'s own parser and turned into the keyword arguments of
  ``Predictor.from_path`` (:func:`warm_options`): ``--no-autozoom`` -> ``autozoom=False``,
  ``--no-refine`` -> ``refine=False``, ``--policy SPEC`` -> ``policy=SPEC``, ``--device`` ->
  ``device``, ``--threads N`` -> ``torch.set_num_threads(N)``. A flag with no in-process
  equivalent (the time-budget flags, folders, weights, or a flag this module does not know) is
  an error rather than silently dropped: use cold mode for it;
- Docker mode: refused (the organizer's command line is fixed: ``sh predict.sh``).
"""
from __future__ import annotations

import shlex
from typing import Iterable, List, Tuple

__all__ = ["split_predict_args", "warm_options"]

# infer option (argparse dest) -> Predictor.from_path keyword, value transform
_TO_KWARG = {
    "no_autozoom": ("autozoom", lambda v: not v),
    "no_refine": ("refine", lambda v: not v),
    "policy": ("policy", lambda v: v),
    "device": ("device", lambda v: v),
}
_WHY_NOT = {
    "inputs": "the evaluation chooses the folders",
    "outputs": "the evaluation chooses the folders",
    "weights": "use the evaluation's --weights",
    "seconds_per_class": "warm mode runs without the per-stage time budget; use cold mode",
    "reserve_seconds": "warm mode runs without the per-stage time budget; use cold mode",
}


def split_predict_args(values: Iterable[str] | None) -> List[str]:
    """The tokens of every ``--predict-arg`` value, in order (each value split by ``shlex``)."""
    return [tok for v in (values or []) for tok in shlex.split(v)]


def warm_options(tokens: List[str]) -> Tuple[dict, int]:
    """``(kwargs for Predictor.from_path, threads)`` of ``python -m infer`` flags (``threads`` 0:
    leave torch's default). Raises ValueError for a flag with no in-process equivalent and
    SystemExit (argparse's usage error) for a flag ``python -m infer`` does not accept."""
    if not tokens:
        return {}, 0
    from infer.__main__ import check_settings, parse_args  # the predictor's own parser and checks
    parsed, defaults = parse_args(list(tokens)), parse_args([])
    problems = check_settings(parsed) + check_settings(defaults)
    if problems:
        raise ValueError("--predict-arg: " + "; ".join(problems))
    given, default = vars(parsed), vars(defaults)
    kwargs, threads = {}, 0
    for dest, value in given.items():
        if value == default.get(dest):
            continue
        if dest == "threads":
            threads = int(value)
        elif dest in _TO_KWARG:
            name, convert = _TO_KWARG[dest]
            kwargs[name] = convert(value)
        else:
            why = _WHY_NOT.get(dest, "no in-process equivalent known to evaluation.predict_args; "
                                     "use cold mode")
            raise ValueError(f"--predict-arg: infer option {dest!r} in warm mode: {why}")
    return kwargs, threads
