"""Docker mode of the local evaluation: run one interaction stage the way the organizer does.

The organizer runs, per stage, exactly

    docker container run --gpus "device=0" -m 32G --rm -v $PWD/inputs/:/workspace/inputs/
        -v $PWD/outputs/:/workspace/outputs/ TEAM:latest /bin/bash -c "sh predict.sh"

(without ``--gpus`` on a host without a GPU). ``run_stage_docker`` builds that same argument list,
optionally with ``--network none`` to prove the image needs no network, empties ``outputs/``
first (the organizer does not, so a crashed stage would hide behind the previous stage's file),
and returns the wall-clock seconds of the container run, which is what the 90 s x K budget counts.

``load_image`` loads a tarball and returns the tag the organizer would run, derived from the
tarball's name: base name, lower-cased, cut at the first '.' and then at the first '_'.

Standard library only; the docker CLI must be on PATH.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


class DockerError(RuntimeError):
    """Docker itself failed (daemon, image, command line), as opposed to the predictor."""


# `docker run` exit codes that come from Docker, not from the command inside the container.
_DOCKER_EXIT_CODES = {125: "docker run itself failed", 126: "the command could not be invoked",
                      127: "the command was not found in the image"}


def image_tag_from_tarball(path: str | os.PathLike) -> str:
    """The ``name:latest`` the organizer runs for a tarball: ``My_Team.v2.tar.gz`` -> ``my:latest``."""
    name = Path(path).name.lower().split(".")[0].split("_")[0]
    if not name:
        raise ValueError(f"{path}: the organizer's rule leaves an empty image name")
    return f"{name}:latest"


def docker_command(image_tag: str, inputs_dir, outputs_dir, gpus: bool,
                   network_none: bool = False, gpu_device: str = "0") -> list[str]:
    """The organizer's command line for one stage, as an argument list (no shell).

    ``inputs_dir`` and ``outputs_dir`` are mounted at /workspace/inputs/ and /workspace/outputs/;
    they are made absolute, as ``$PWD/inputs/`` is in the organizer's script. ``gpu_device``: the
    host GPU of ``--gpus device=...`` (the organizer's 0; another one for a sharded evaluation's
    worker).
    """
    mounts = []
    for host, target in ((inputs_dir, "/workspace/inputs/"), (outputs_dir, "/workspace/outputs/")):
        host = os.path.abspath(os.fspath(host))
        if ":" in host or "," in host:
            raise ValueError(f"{host}: a ':' or ',' in the path breaks 'docker run -v'")
        mounts += ["-v", f"{host}/:{target}"]
    cmd = ["docker", "container", "run"]
    if gpus:
        cmd += ["--gpus", f"device={gpu_device}"]
    cmd += ["-m", "32G", "--rm"]
    if network_none:
        cmd += ["--network", "none"]
    return cmd + mounts + [image_tag, "/bin/bash", "-c", "sh predict.sh"]


def empty_dir(path) -> None:
    """Remove everything inside ``path`` (created if missing), keep the folder itself."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def run_stage_docker(image_tag: str, inputs_dir, outputs_dir, gpus: bool,
                     network_none: bool = False, gpu_device: str = "0") -> float:
    """Run one stage with the organizer's command; return the container's wall-clock seconds.

    ``outputs_dir`` is emptied first. A failing predictor is not an error here (the organizer
    scores its missing output as zeros; a warning goes to stderr), but a failure of Docker itself
    (exit codes 125-127: no daemon, unknown image, ...) raises ``DockerError``. The container's
    output goes to this process's stdout/stderr.
    """
    empty_dir(outputs_dir)
    cmd = docker_command(image_tag, inputs_dir, outputs_dir, gpus, network_none, gpu_device)
    t0 = time.perf_counter()
    try:
        rc = subprocess.run(cmd, check=False).returncode
    except FileNotFoundError as exc:
        raise DockerError("no 'docker' command on PATH") from exc
    seconds = time.perf_counter() - t0
    if rc in _DOCKER_EXIT_CODES:
        raise DockerError(f"{_DOCKER_EXIT_CODES[rc]} (exit {rc}): {' '.join(cmd)}")
    if rc != 0:
        print(f"docker_runner: the container exited with {rc} after {seconds:.1f} s",
              file=sys.stderr)
    return seconds


def host_has_gpu() -> bool:
    """True when ``nvidia-smi -L`` lists a GPU: the organizer then adds ``--gpus "device=0"``."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def load_image(tarball_or_tag) -> str:
    """``docker load`` a tarball and return the tag the organizer would run; a tag is checked.

    A tag without ``:`` gets ``:latest``. Raises ``DockerError`` if the image is not there
    afterwards (e.g. a tarball whose name does not match the image it holds).
    """
    source = os.fspath(tarball_or_tag)
    if os.path.isfile(source):
        tag = image_tag_from_tarball(source)
        proc = subprocess.run(["docker", "load", "-i", source], capture_output=True, text=True)
        if proc.returncode != 0:
            raise DockerError(f"docker load -i {source} failed: {proc.stderr.strip()}")
    else:
        tag = source if ":" in source.rsplit("/", 1)[-1] else f"{source}:latest"
    proc = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", tag],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        where = f" after loading {source}" if os.path.isfile(source) else ""
        raise DockerError(f"no image {tag}{where}: the organizer would run {tag} and fail")
    return tag
