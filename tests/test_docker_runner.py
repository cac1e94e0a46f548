"""evaluation.docker_runner without Docker: the organizer's exact command line, the tag rule for
tarballs, emptying outputs/ before a stage, and a fake `docker` first on PATH."""
import os
import shlex
from pathlib import Path

import pytest

from evaluation.docker_runner import (DockerError, docker_command, image_tag_from_tarball,
                                      load_image, run_stage_docker)

ORGANIZER = ('docker container run --gpus "device=0" -m 32G --rm -v $PWD/inputs/:/workspace/inputs/ '
             '-v $PWD/outputs/:/workspace/outputs/ TEAM:latest /bin/bash -c "sh predict.sh"')


@pytest.mark.parametrize("tarball, tag", [
    ("team.tar.gz", "team:latest"),
    ("my_team.v2.tar.gz", "my:latest"),
    ("/some/dir/Team-A.tar.gz", "team-a:latest"),
    ("UPPER_case.tar", "upper:latest"),
])
def test_tag_from_tarball_like_the_organizer(tarball, tag):
    assert image_tag_from_tarball(tarball) == tag


def test_command_is_the_organizers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = shlex.split(ORGANIZER.replace("$PWD", str(tmp_path)))
    assert docker_command("TEAM:latest", "inputs", "outputs", gpus=True) == expected
    no_gpu = [a for a in expected if a not in ("--gpus", "device=0")]
    assert docker_command("TEAM:latest", tmp_path / "inputs", tmp_path / "outputs", gpus=False) == no_gpu
    offline = docker_command("TEAM:latest", "inputs", "outputs", gpus=False, network_none=True)
    assert offline[:7] == ["docker", "container", "run", "-m", "32G", "--rm", "--network"]
    assert offline[7] == "none" and offline[8:] == no_gpu[6:]
    with pytest.raises(ValueError):
        docker_command("t:latest", "/a:b/inputs", "outputs", gpus=False)


FAKE_DOCKER = r"""#!/usr/bin/env bash
printf '%s\n' "$@" >"$FAKE_LOG"
case "$1" in
    container)
        out=$(printf '%s\n' "$@" | sed -n 's#^\(.*\)/:/workspace/outputs/$#\1#p')
        ls -A "$out" >"$FAKE_LOG.outputs_before"
        echo made >"$out/case.npz"
        exit "${FAKE_RC:-0}" ;;
    image) [ "$5" = "${FAKE_KNOWN:-team:latest}" ] && echo sha256:1 && exit 0; exit 1 ;;
    load) exit 0 ;;
esac
"""


@pytest.fixture
def fake_docker(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "docker"
    exe.write_text(FAKE_DOCKER)
    exe.chmod(0o755)
    log = tmp_path / "docker.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    return log


def test_run_stage_empties_outputs_and_runs_the_command(tmp_path, fake_docker):
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    inputs.mkdir()
    (outputs / "stale_dir").mkdir(parents=True)
    (outputs / "case.npz").write_text("stale output of the previous stage")
    seconds = run_stage_docker("team:latest", inputs, outputs, gpus=True, network_none=True)
    assert seconds >= 0
    argv = fake_docker.read_text().splitlines()
    assert argv == docker_command("team:latest", inputs, outputs, gpus=True, network_none=True)[1:]
    assert Path(f"{fake_docker}.outputs_before").read_text() == ""  # emptied before the run
    assert (outputs / "case.npz").read_text() == "made\n"


def test_predictor_failure_is_not_a_docker_error(tmp_path, fake_docker, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_RC", "1")
    run_stage_docker("team:latest", tmp_path / "in", tmp_path / "out", gpus=False)
    assert "exited with 1" in capsys.readouterr().err
    monkeypatch.setenv("FAKE_RC", "125")
    with pytest.raises(DockerError, match="docker run itself failed"):
        run_stage_docker("team:latest", tmp_path / "in", tmp_path / "out", gpus=False)


def test_load_image_checks_the_derived_tag(tmp_path, fake_docker, monkeypatch):
    tarball = tmp_path / "team.tar.gz"
    tarball.write_bytes(b"x")
    assert load_image(tarball) == "team:latest"
    assert load_image("team") == "team:latest"
    wrong = tmp_path / "other_name.tar.gz"
    wrong.write_bytes(b"x")
    with pytest.raises(DockerError, match="no image other:latest after loading"):
        load_image(wrong)
