"""The documentation's commands work as written.

Every command in the shell code blocks of README.md and docs/*.md, and every inline command
(`` `sh predict.sh --help` ``-style spans starting with one of ``COMMAND_STARTS``), is parsed:
each script it names must exist, each ``python -m MODULE`` must name a module of this repository
(or an installed one) whose ``--help`` prints usage without a traceback, and nothing else may be
called but a few known outside tools. The README's Python example runs for real on a sample case,
the quick-start command runs for real into a temporary folder, and CI runs the README's test
command.
"""
import json
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
# commands the documentation may call that are not part of this repository
OUTSIDE_TOOLS = {"docker", "cp", "git", "mkdir", "ln", "ls"}
COMMAND_STARTS = (".venv/bin/python ", ".venv/bin/torchrun ", "sh predict.sh", "bash scripts/", "./build.sh")
VENV_PYTHON = ".venv/bin/python"


def _blocks(path: Path):
    """(info string, text) of each fenced code block of a markdown file."""
    return re.findall(r"^```([^\n]*)\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def _shell_lines(text: str):
    """Logical lines of a shell block: continuations joined, comments and blank lines dropped,
    trailing ``  # comment`` removed."""
    text = text.replace("\\\n", " ")
    for line in text.splitlines():
        line = re.split(r"\s+#\s", line.strip(), maxsplit=1)[0].strip()
        if line and not line.startswith("#"):
            yield line


def _inline_commands(path: Path):
    """Commands outside fenced blocks: inline code spans and indented (4-space) code lines that
    start with one of ``COMMAND_STARTS`` (after ``VAR=value`` prefixes)."""
    prose = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    spans = re.findall(r"`([^`\n]+)`", prose)
    indented = [re.split(r"\s+#\s", l.strip(), maxsplit=1)[0] for l in re.findall(r"^    (\S.*)$", prose, flags=re.M)]
    bare = lambda c: re.sub(r"^([A-Z_][A-Z0-9_]*=\S*\s+)+", "", c)  # noqa: E731
    return [c for c in spans + indented if bare(c).startswith(COMMAND_STARTS)]


def _commands(path: Path):
    """Every simple command (split at ``&&``) of ``path``: (source line, argv)."""
    lines = [l for info, text in _blocks(path) if info.strip() in ("", "sh", "bash", "shell")
             for l in _shell_lines(text)]
    lines += _inline_commands(path)
    out = []
    for line in lines:
        if re.fullmatch(r"(for|while) .*; do|done", line):  # a loop's own lines: its body is checked
            continue
        for part in line.split("&&"):
            argv = shlex.split(part.replace("[", " ").replace("]", " ").replace("|", " "))
            while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):  # VAR=value prefixes
                argv = argv[1:]
            if argv:
                out.append((line, argv))
    return out


ALL = [(p.relative_to(ROOT).as_posix(), line, argv) for p in DOCS for line, argv in _commands(p)]


def _module_of(argv):
    """The module a ``python -m M`` / ``torchrun ... -m M`` command runs, else None."""
    if argv[0] not in (VENV_PYTHON, ".venv/bin/torchrun"):
        return None
    return argv[argv.index("-m") + 1] if "-m" in argv[:-1] else None


def test_the_documentation_has_commands():
    # guards the parser: the README alone holds the quick start, the tests and the image build
    readme = [argv for doc, _, argv in ALL if doc == "README.md"]
    assert len(readme) >= 6, readme
    assert any(a[:2] == ["sh", "predict.sh"] for a in readme)


@pytest.mark.parametrize("doc, line, argv", ALL, ids=[f"{d}: {l[:60]}" for d, l, _ in ALL])
def test_every_documented_command_names_something_that_exists(doc, line, argv):
    head = argv[0]
    if head in ("sh", "bash"):
        assert (ROOT / argv[1]).is_file(), f"{doc}: {line!r}: no {argv[1]}"
    elif head.startswith("./"):
        script = ROOT / head[2:]
        assert script.is_file() and script.stat().st_mode & 0o111, f"{doc}: {line!r}: {head} is not an executable"
    elif head in (VENV_PYTHON, ".venv/bin/torchrun"):
        module = _module_of(argv)
        if module is None:  # python path/to/script.py
            assert (ROOT / argv[1]).is_file(), f"{doc}: {line!r}: no {argv[1]}"
        else:
            assert _find_module(module), f"{doc}: {line!r}: no module {module}"
        for arg in argv[1:]:  # repository paths named as arguments (e.g. a test file)
            if re.fullmatch(r"(tests|scripts)/[\w/]+\.(py|sh)", arg):
                assert (ROOT / arg).is_file(), f"{doc}: {line!r}: no {arg}"
    else:
        assert head in OUTSIDE_TOOLS, f"{doc}: {line!r}: unknown command {head!r} (bare python? use {VENV_PYTHON})"


@lru_cache(maxsize=None)
def _find_module(name: str) -> bool:
    r = subprocess.run([sys.executable, "-c", f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is None)"],
                       cwd=ROOT, capture_output=True)
    return r.returncode == 0


HELP = sorted({m for _, _, argv in ALL if (m := _module_of(argv)) and m != "pytest"}
              | {"scripts.memory_bench", "scripts.make_sample_inputs"})


# One interpreter runs every module's --help in turn (runpy, as ``python -m`` does): torch is
# imported once, not once per module.
HELP_RUNNER = r"""
import contextlib, io, json, runpy, sys, traceback
results = {}
for module in sys.argv[1:]:
    out, code, error = io.StringIO(), None, None
    sys.argv = [module, "--help"]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        error = traceback.format_exc()
    results[module] = {"code": code, "stdout": out.getvalue(), "error": error}
print("HELP " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def help_texts():
    r = subprocess.run([sys.executable, "-c", HELP_RUNNER, *HELP], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    lines = [l for l in r.stdout.splitlines() if l.startswith("HELP ")]
    assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(lines[-1][len("HELP "):])


@pytest.mark.parametrize("module", HELP)
def test_documented_modules_print_help_without_a_traceback(module, help_texts):
    res = help_texts[module]
    assert res["error"] is None, res["error"]
    assert res["code"] in (0, None) and res["stdout"].startswith("usage:"), res
    assert not _options_without_help(res["stdout"]), res["stdout"]


def _options_without_help(text: str) -> list:
    """Options in an argparse help text that have no help string: the option line holds only the
    invocation and the next line is not an indented continuation."""
    lines = text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$", line)
        if not m or m.group(2):
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if not re.match(r"^ {6,}\S", nxt):
            missing.append(m.group(1))
    return missing


def test_options_without_help_are_found():
    text = ("options:\n  -h, --help  show this help message and exit\n  --seed SEED\n"
            "  --layout {train,val}\n                        train or val\n  --no-gpus\n")
    assert _options_without_help(text) == ["--seed SEED", "--no-gpus"]


@pytest.mark.parametrize("argv", [["sh", "predict.sh", "--help"], ["bash", "build.sh", "--help"]])
def test_documented_scripts_print_help(argv):
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "--weights" in r.stdout


@pytest.mark.slow
def test_readme_python_example_runs_on_a_sample_case():
    code = _python_blocks()[0]
    assert len(code.strip().splitlines()) <= 6
    # after the example: the output has the case's shape, and every class of the ground truth
    # (which the example never reads) got voxels, nothing else did
    check = code + ("\nimport json, numpy as np\n"
                    "gts = np.load('sample_inputs/gts/' + case['name'])['gts']\n"
                    "print('CHECK', json.dumps([list(segs.shape) == list(case['imgs'].shape), str(segs.dtype),\n"
                    "      np.unique(segs).tolist(), np.unique(gts).tolist()]))\n")
    same_shape, dtype, labels, gt_labels = _run_check(check)
    assert same_shape and dtype == "uint8"
    assert labels == gt_labels


def _run_check(code: str) -> list:
    """Run ``code`` in a fresh interpreter at the repository root; return the JSON it printed
    after ``CHECK ``."""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (line,) = [l for l in r.stdout.splitlines() if l.startswith("CHECK ")]
    return json.loads(line[len("CHECK "):])


def _python_blocks():
    """The README's python examples: the Predictor one, then the Session one that continues it."""
    blocks = [text for info, text in _blocks(ROOT / "README.md") if info.strip() == "python"]
    assert len(blocks) == 2 and "Predictor.from_path" in blocks[0] and "Session(" in blocks[1]
    return blocks


@pytest.mark.slow
def test_readme_session_example_runs_on_a_sample_case():
    first, session = _python_blocks()
    assert len(session.strip().splitlines()) <= 8
    # after the example (box, click, undo on class 1 of the box sample): one object, labels 0/1
    # only, and its mask overlaps class 1 of the ground truth (never read by the example)
    check = first + session + ("\nimport json, numpy as np\n"
                               "gts = np.load('sample_inputs/gts/' + case['name'])['gts'] == 1\n"
                               "dice = 2 * (gts & (mask == 1)).sum() / (gts.sum() + (mask == 1).sum())\n"
                               "print('CHECK', json.dumps([np.unique(mask).tolist(), session.n_objects, float(dice)]))\n")
    labels, n_objects, dice = _run_check(check)
    assert labels == [0, 1] and n_objects == 1
    assert dice > 0.5, dice


@pytest.mark.slow
def test_readme_quick_start_command_runs(tmp_path):
    (block,) = [text for info, text in _blocks(ROOT / "README.md")
                if info.strip() == "sh" and "setup_venv.sh" in text]
    (line,) = list(_shell_lines(block))
    setup, job = (p.strip() for p in line.split("&&"))
    assert setup == "bash scripts/setup_venv.sh"
    argv = shlex.split(job)
    argv[argv.index("--outputs") + 1] = str(tmp_path / "outputs")
    # PYTHON unset: predict.sh must find an interpreter with torch by itself (python3 or .venv)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    for case in sorted((ROOT / "sample_inputs").glob("*.npz")):
        with np.load(tmp_path / "outputs" / case.name) as f:
            assert list(f.keys()) == ["segs"]


def test_ci_runs_the_readme_test_command():
    blocks = [text for info, text in _blocks(ROOT / "README.md") if info.strip() == "sh"]
    (command,) = [l for b in blocks for l in _shell_lines(b) if "pytest" in l and "not slow" not in l]
    ci = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci, f"{command!r} not in .ci/run"


def _option_block(text: str, option: str) -> str:
    """The help entry of ``option``: its line and the indented lines that continue it."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if re.match(rf"^  {re.escape(option)}\b", l))
    end = next((j for j in range(start + 1, len(lines)) if not re.match(r"^ {6,}\S", lines[j])), len(lines))
    return " ".join(l.strip() for l in lines[start:end])


def test_train_help_shows_the_recipe_defaults(help_texts):
    text = help_texts["train"]["stdout"]
    # the seed paper's recipe as docs/TRAINING.md states it: AdamW 1e-4, batch 2
    for option, default in [("--epochs", "10"), ("--steps-per-epoch", "250"), ("--lr", "0.0001"),
                            ("--batch-size", "2"), ("--seed", "0"), ("--weight-decay", "3e-05")]:
        assert f"(default: {default})" in _option_block(text, option), _option_block(text, option)
