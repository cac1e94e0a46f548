"""Prepare the production weights folder for the image from the public nnInteractive v1.0 release.

    python -m scripts.prepare_weights                       # download from the Hugging Face hub
    python -m scripts.prepare_weights --source DIR          # a release folder already on disk
    ./build.sh --weights weights/nninteractive_v1.0         # then build the image with it

The release (``plans.json``, ``dataset.json``, ``inference_session_class.json``,
``fold_0/checkpoint_final.pth``) is converted with ``python -m infer.convert SRC DST`` into the
tensor-only artifact (``weights.pt`` + ``model_card.json``) and the sha256 of every release file
and of ``weights.pt`` is written to ``DST/provenance.json`` (and printed). Build time only: the
download needs ``huggingface_hub`` (imported only on that path, never in the image) and the
network; the image never downloads anything.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch

from infer.card import DEFAULT_CHANNELS, ModelCard
from infer.network import build_network, normalize_arch
from infer.weights import sha256_file
from infer.writer import atomic_write
from scripts.bench import FULL_ARCH, FULL_PATCH

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "nnInteractive/nnInteractive"
MODEL = "nnInteractive_v1.0"
DEFAULT_DST = ROOT / "weights" / "nninteractive_v1.0"
RELEASE_FILES = ("plans.json", "dataset.json", "inference_session_class.json",
                 "fold_0/checkpoint_final.pth")
PROVENANCE = "provenance.json"
V1_PARAMETERS = 102_355_818  # nnInteractive v1.0 (8 inputs, 2 outputs); tests rebuild it independently


class PrepareError(RuntimeError):
    """The weights cannot be fetched, found or converted."""


def download_release(repo_id: str, model: str, revision: str | None, download_dir) -> tuple[Path, str]:
    """Fetch ``model/*`` of ``repo_id`` into ``download_dir``; return (release folder, commit).

    The revision is resolved to a commit hash first and that commit is downloaded, so the
    recorded revision is exactly what was fetched.
    """
    try:
        import huggingface_hub  # build-time only dependency, never in the image
    except ImportError:
        raise PrepareError("downloading needs huggingface_hub (pip install huggingface_hub); "
                           "or pass --source with a release folder already on disk") from None
    try:
        commit = huggingface_hub.HfApi().model_info(repo_id, revision=revision).sha
        huggingface_hub.snapshot_download(repo_id=repo_id, revision=commit,
                                          allow_patterns=[f"{model}/*"], local_dir=str(download_dir))
    except Exception as e:  # network, authentication, unknown revision: all end the same way
        raise PrepareError(f"download of {repo_id} ({model}) failed: {e}") from e
    return Path(download_dir) / model, commit


def release_root(src) -> Path:
    """``src`` itself if it is a release folder, else its one sub-folder that is."""
    src = Path(src)
    if (src / "plans.json").is_file():
        return src
    found = sorted(p.parent for p in src.glob("*/plans.json"))
    if len(found) == 1:
        return found[0]
    raise PrepareError(f"{src} is not an nnInteractive release folder (no plans.json in it"
                       f"{' or in one sub-folder' if not found else f'; several: {found}'})")


def parameter_count(card: ModelCard) -> int:
    """Parameters of the network the card describes (built on the meta device: no memory)."""
    with torch.device("meta"):
        net = build_network(card.architecture, card.input_channels, card.num_classes)
    return sum(p.numel() for p in net.parameters())


def release_checks(src: Path, card: ModelCard, expect_sha256: str | None) -> list[tuple[str, str]]:
    """What can be checked of a converted release, as (status, text) rows; status is "ok",
    "differs" (not the published v1.0: fine for a fine-tuned model, worth a look otherwise) or
    "not checked" (nothing here can tell)."""
    rows = []
    absent = [f for f in RELEASE_FILES if not (src / f).is_file()]
    rows.append(("ok", "layout: " + ", ".join(RELEASE_FILES)) if not absent else
                ("differs", f"layout: {', '.join(absent)} absent (the converter's defaults are used)"))
    v1 = normalize_arch(FULL_ARCH)
    diff = [k for k in v1 if card.architecture.get(k) != v1[k]]
    rows.append(("ok", "architecture: nnInteractive v1.0's residual-encoder U-Net (ResEnc-L, 6 stages, "
                       "features 32-64-128-256-320-320)") if not diff else
                ("differs", f"architecture: not nnInteractive v1.0's ({', '.join(diff)} differ)"))
    patch = tuple(card.patch_size)
    rows.append(("ok" if patch == tuple(FULL_PATCH) else "differs",
                 f"patch size: {'x'.join(map(str, patch))} (v1.0: {'x'.join(map(str, FULL_PATCH))})"))
    layout = tuple(card.channels) == DEFAULT_CHANNELS and card.num_classes == 2
    rows.append(("ok" if layout else "differs",
                 f"channels: {card.input_channels} in ({', '.join(card.channels)}), {card.num_classes} out"))
    n, n_v1 = parameter_count(card), V1_PARAMETERS
    rows.append(("ok" if n == n_v1 else "differs",
                 f"parameters: {n:,} (v1.0: {n_v1:,}); every tensor matched the architecture"))
    rows.append(("ok", f"prompts: {card.box_style} boxes, click radius {card.click_radius:g}, "
                       f"decay {card.prompt_decay:g}"))
    if expect_sha256:
        rows.append(("ok", "checkpoint sha256: equals --expect-sha256"))
    else:
        rows.append(("not checked", "that this is the published checkpoint, byte for byte (no hash "
                                    "was given: pass --expect-sha256 with the hash you trust)"))
    rows.append(("not checked", "segmentation quality (score it: python -m evaluation ... --weights DST)"))
    rows.append(("not checked", "the GPU path and its memory (on a GPU host: bash scripts/gpu_check.sh --quick)"))
    return rows


def convert(src: Path, dst: Path, box_style: str) -> None:
    """Run ``python -m infer.convert SRC DST`` (the project's converter) in a child process."""
    cmd = [sys.executable, "-m", "infer.convert", str(src), str(dst), "--box-style", box_style]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PrepareError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip() or proc.stdout.strip()}")
    print(proc.stdout.strip())


def prepare(dst, source=None, repo_id: str = REPO_ID, model: str = MODEL, revision=None,
            download_dir=None, box_style: str = "2d", expect_sha256: str | None = None,
            force: bool = False) -> dict:
    """Fetch (or take) the release, convert it into ``dst``, record sha256s; return the record."""
    dst = Path(dst).resolve()
    if dst.exists() and not force:
        raise PrepareError(f"{dst} exists; pass --force to replace it")
    if source is not None:
        src = release_root(source)
        origin = {"local_folder": str(src)}
    else:
        download_dir = Path(download_dir or dst.parent / f"{dst.name}-download")
        src, commit = download_release(repo_id, model, revision, download_dir)
        src = release_root(src)
        origin = {"huggingface_repo": repo_id, "model": model, "revision": commit}
    missing = [f for f in RELEASE_FILES if not (src / f).is_file() and f != "inference_session_class.json"]
    if missing:
        raise PrepareError(f"{src} lacks {missing}")
    release_sha = {f: sha256_file(src / f) for f in RELEASE_FILES if (src / f).is_file()}
    ckpt_sha = release_sha["fold_0/checkpoint_final.pth"]
    if expect_sha256 and ckpt_sha != expect_sha256.lower():
        raise PrepareError(f"{src}/fold_0/checkpoint_final.pth has sha256 {ckpt_sha}, "
                           f"expected {expect_sha256}")

    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dst, folder=True) as tmp:
        tmp = Path(tmp)
        convert(src, tmp, box_style)
        card = json.loads((tmp / "model_card.json").read_text())
        weights = tmp / card.get("weights_file", "weights.pt")
        weights_sha = sha256_file(weights)
        if card.get("weights_sha256") != weights_sha:
            raise PrepareError(f"model card sha256 {card.get('weights_sha256')} does not match "
                               f"{weights.name} ({weights_sha})")
        if card.get("demo"):
            raise PrepareError("the converted card says demo: true; a release is not a demo")
        record = {
            "source": origin,
            "release_sha256": release_sha,
            "weights_file": weights.name,
            "weights_sha256": weights_sha,
            "model_card_sha256": sha256_file(tmp / "model_card.json"),
            "box_style": box_style,
            "converted_with": "python -m infer.convert SRC DST --box-style " + box_style,
            "prepared_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        record["checks"] = [{"status": st, "check": text} for st, text in
                            release_checks(src, ModelCard.load(tmp / "model_card.json"), expect_sha256)]
        (tmp / PROVENANCE).write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.prepare_weights",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--source", help="release folder on disk (else: download from the hub)")
    ap.add_argument("--dst", default=str(DEFAULT_DST), help="artifact folder to write (default: %(default)s)")
    ap.add_argument("--repo-id", default=REPO_ID, help="Hugging Face repository (default: %(default)s)")
    ap.add_argument("--model", default=MODEL, help="release sub-folder in it (default: %(default)s)")
    ap.add_argument("--revision", help="branch, tag or commit to download (default: main, recorded as its commit)")
    ap.add_argument("--download-dir", help="where the download goes (default: beside --dst)")
    ap.add_argument("--box-style", choices=("2d", "3d"), default="2d",
                    help="box style for the card (v1.0 was trained with 2d boxes; default: %(default)s)")
    ap.add_argument("--expect-sha256", help="refuse a checkpoint_final.pth with another sha256")
    ap.add_argument("--force", action="store_true", help="replace an existing --dst")
    args = ap.parse_args(argv)
    try:
        record = prepare(args.dst, args.source, args.repo_id, args.model, args.revision,
                         args.download_dir, args.box_style, args.expect_sha256, args.force)
    except PrepareError as e:
        print(f"prepare_weights: error: {e}", file=sys.stderr)
        return 1
    dst = Path(args.dst)
    for row in record["checks"]:
        print(f"{row['status']:>11}  {row['check']}")
    for name, sha in record["release_sha256"].items():
        print(f"release  {sha}  {name}")
    print(f"artifact {record['weights_sha256']}  {dst / record['weights_file']}")
    print(f"recorded in {dst / PROVENANCE}; build with: ./build.sh --weights {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
