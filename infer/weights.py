"""Load a network and its model card from a converted artifact or an nnInteractive release folder.

Nothing here executes pickled code: every file goes through ``torch.load(weights_only=True)``.
A release checkpoint additionally needs numpy scalars (its training log holds numpy.float64
values), so for that file only numpy's scalar reconstructor, ``numpy.dtype``, a few numpy dtype
classes and ``_codecs.encode`` (how protocol-2 pickles store bytes) are admitted; any other global
raises WeightsError naming it, before anything runs.

Layouts accepted by ``load_model(path)`` (``path`` may also be the folder one level above, as in a
Hugging Face download holding ``nnInteractive_v1.0/``):
- artifact: ``model_card.json`` + ``weights.pt`` (a plain dict of tensors);
- release: ``plans.json``, ``inference_session_class.json``, ``fold_0/checkpoint_final.pth``.
"""
from __future__ import annotations

import _codecs
import hashlib
import json
import logging
import pickle
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .card import CARD_FILE, DEFAULT_CHANNELS, CardError, ModelCard
from .network import ArchitectureError, ResidualEncoderUNet, build_network, normalize_arch

STEM_KEY = "encoder.stem.convs.0.conv.weight"
# The interaction policy an nnInteractive release runs with unless told otherwise: nnInteractive
# 1.1.5's own loop with overlapping classes merged by probability (docs/POLICY.md, "Release
# weights", gives the evidence; "reference" is the loop alone)
RELEASE_POLICY = "release"

log = logging.getLogger("infer")


class WeightsError(RuntimeError):
    """Weights cannot be found, read safely, or matched to the architecture."""


def sha256_file(path) -> str:
    """Hex sha256 of a file's bytes (~1.5 GB/s; hashlib releases the GIL, so it runs in a thread
    beside the tensor loading)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _kind(folder: Path) -> str | None:
    if (folder / CARD_FILE).is_file():
        return "artifact"
    return "release" if (folder / "plans.json").is_file() else None


def find_model_root(path) -> tuple[str, Path]:
    """Return ("artifact" | "release", folder) for ``path`` or its single model sub-folder.

    A folder holding no model itself but exactly one model sub-folder (``weights/`` holding
    ``weights/demo``, or a Hugging Face download holding ``nnInteractive_v1.0/``) is accepted and
    the sub-folder used is logged; several candidates raise WeightsError naming them."""
    path = Path(path)
    if path.is_file() and path.name == CARD_FILE:
        path = path.parent
    if not path.is_dir():
        raise WeightsError(f"weights path {path} is not a folder")
    kind = _kind(path)
    if kind:
        return kind, path
    nested = [(k, p) for p in sorted(path.iterdir()) if p.is_dir() and (k := _kind(p))]
    if len(nested) == 1:
        log.info("weights: %s holds no model itself; using its only model folder %s (%s)",
                 path, nested[0][1], nested[0][0])
        return nested[0]
    if nested:
        raise WeightsError(f"{path} holds several models {[str(p) for _, p in nested]}; "
                           f"point --weights at one of them")
    raise WeightsError(f"{path} holds neither {CARD_FILE} (converted artifact) nor plans.json "
                       f"(nnInteractive release), nor a single sub-folder with one")


def _checkpoint_globals() -> list:
    """The extra globals a release checkpoint needs (numpy imported lazily, numpy 1 or 2)."""
    import numpy as np
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    allowed = [(scalar, "numpy._core.multiarray.scalar"), (scalar, "numpy.core.multiarray.scalar"),
               np.dtype, _codecs.encode]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: dtype instances have their own class
    for name in ("Float64DType", "Float32DType", "Int64DType"):
        if hasattr(dtypes, name):
            allowed.append(getattr(dtypes, name))
    return allowed


_HARMLESS = re.compile(r"^(torch\.|collections\.OrderedDict$|_codecs\.encode$|numpy\.dtype$|"
                       r"numpy\.dtypes\.|numpy\.(_core|core)\.multiarray\.scalar$)")


def referenced_globals(path) -> list[str]:
    """Names of the globals (``module.name``) a checkpoint's pickle refers to, read with
    pickletools only (nothing is executed). Used to name what was refused."""
    import io
    import pickletools
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            blobs = [z.read(n) for n in z.namelist() if n.endswith("data.pkl")]
    else:
        blobs = [Path(path).read_bytes()]
    names, strings = [], []
    for blob in blobs:
        stream = io.BytesIO(blob)
        while stream.tell() < len(blob):  # a legacy file is several pickles in a row
            try:
                for op, arg, _ in pickletools.genops(stream):
                    if isinstance(arg, str):
                        strings.append(arg)
                    if op.name in ("GLOBAL", "INST"):
                        names.append(arg.replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(".".join(strings[-2:]))
            except Exception:  # the tensor payload of a legacy file is not a pickle
                break
    return list(dict.fromkeys(names))


def safe_torch_load(path, extra_globals=()) -> object:
    """torch.load(weights_only=True, mmap when the file is a zip archive) on CPU, admitting only
    torch's defaults plus ``extra_globals``. A refused global raises WeightsError naming it."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        msg = str(e)
        m = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"but got <class '([\w.]+)'>", msg)
        named = [n for n in referenced_globals(path) if not _HARMLESS.match(n)]
        what = ", ".join(named) or (m.group(1) if m else msg.strip().splitlines()[-1][:200])
        raise WeightsError(f"{path}: refused to unpickle global(s) {what}: only tensors, plain "
                           f"containers and numbers, torch.device and numpy scalars are allowed; "
                           f"nothing from this file was executed") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise WeightsError(f"{path}: cannot read weights: {e}") from None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path}: {e}") from None


def resolve_configuration(plans: dict, name: str) -> dict:
    """plans['configurations'][name] with 'inherits_from' resolved (child keys override parent)."""
    configs = plans.get("configurations", {})
    chain, seen = [], set()
    while name is not None:
        if name in seen or name not in configs:
            raise WeightsError(f"configuration {name!r} is missing from plans.json or inherits in "
                               f"a loop (known: {sorted(configs)})")
        seen.add(name)
        chain.append(configs[name])
        name = configs[name].get("inherits_from")
    out = {}
    for cfg in reversed(chain):
        out.update(cfg)
    return out


def _strip_prefix(sd: dict) -> dict:
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def read_release(root, box_style: str = "2d", demo: bool = False) -> tuple[dict, ModelCard]:
    """Read an nnInteractive release folder -> (state dict of tensors, ModelCard without sha)."""
    root = Path(root)
    ckpts = sorted(root.glob("fold_*/checkpoint_final.pth"))
    if len(ckpts) != 1:
        raise WeightsError(f"{root}: expected exactly one fold_*/checkpoint_final.pth, found "
                           f"{[str(c.relative_to(root)) for c in ckpts]}")
    ckpt = safe_torch_load(ckpts[0], _checkpoint_globals())
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network_weights"), dict):
        raise WeightsError(f"{ckpts[0]}: not an nnU-Net checkpoint (no 'network_weights' dict)")
    config_name = (ckpt.get("init_args") or {}).get("configuration")
    if not isinstance(config_name, str):
        raise WeightsError(f"{ckpts[0]}: init_args['configuration'] is missing")
    config = resolve_configuration(_read_json(root / "plans.json"), config_name)
    if "architecture" not in config or "patch_size" not in config:
        raise WeightsError(f"configuration {config_name!r} has no architecture / patch_size")
    sd = _strip_prefix(ckpt["network_weights"])
    session = {}
    if (root / "inference_session_class.json").is_file():
        session = _read_json(root / "inference_session_class.json")
        session = session if isinstance(session, dict) else {}  # a bare class name: defaults
    try:
        arch = normalize_arch(config["architecture"])
        n_stages = arch["n_stages"]
        in_ch = int(sd[STEM_KEY].shape[1])
        n_cls = int(sd[f"decoder.seg_layers.{n_stages - 2}.weight"].shape[0])
    except (ArchitectureError, KeyError) as e:
        raise WeightsError(f"{root}: architecture does not fit the checkpoint: {e}") from None
    if in_ch != len(DEFAULT_CHANNELS):
        raise WeightsError(f"{root}: the network takes {in_ch} input channels; only the "
                           f"nnInteractive layout {list(DEFAULT_CHANNELS)} is known")
    try:
        card = ModelCard(
            architecture=arch, input_channels=in_ch, num_classes=n_cls,
            patch_size=list(config["patch_size"]), channels=DEFAULT_CHANNELS,
            box_style=box_style, click_radius=session.get("point_radius", 4),
            prompt_decay=session.get("interaction_decay", 0.9), demo=demo,
            policy=RELEASE_POLICY,
            source=f"nnInteractive release {root.name!r}, configuration {config_name}, "
                   f"trainer {ckpt.get('trainer_name')}")
    except CardError as e:
        raise WeightsError(f"{root}: {e}") from None
    return sd, card


def read_artifact(root) -> tuple[dict, ModelCard]:
    """Read a converted artifact folder -> (state dict, card). No sha256 check here."""
    root = Path(root)
    try:
        card = ModelCard.load(root / CARD_FILE)
    except CardError as e:
        raise WeightsError(str(e)) from None
    sd = safe_torch_load(root / card.weights_file)
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in sd.items()):
        raise WeightsError(f"{root / card.weights_file}: not a plain dict of tensors")
    return sd, card


def instantiate(card: ModelCard, state_dict: dict, device="cpu") -> ResidualEncoderUNet:
    """Build the card's network without initialising parameters (meta device), load the state
    dict strictly (assign=True: the loaded tensors become the parameters, no extra copy), move to
    ``device``, eval mode, no grad."""
    with torch.device("meta"):
        net = build_network(card.architecture, card.input_channels, card.num_classes)
    try:
        net.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise WeightsError(f"weights do not match the architecture: {e}") from None
    return net.to(device).eval().requires_grad_(False)


def load_model(path, device="cpu", verify: bool = True) -> tuple[ResidualEncoderUNet, ModelCard]:
    """Load -> (network in eval mode on ``device``, ModelCard).

    ``verify``: for an artifact whose card has weights_sha256, hash weights.pt in a background
    thread while the tensors load and raise WeightsError on mismatch (costs ~0.3 s per 400 MB of
    CPU, overlapped with loading; the file is read once more, mostly from the page cache).
    """
    kind, root = find_model_root(path)
    if kind == "release":
        sd, card = read_release(root)
        return instantiate(card, sd, device), card
    try:
        card = ModelCard.load(root / CARD_FILE)
    except CardError as e:
        raise WeightsError(str(e)) from None
    with ThreadPoolExecutor(1) as pool:
        digest = None
        if verify and card.weights_sha256 and (root / card.weights_file).is_file():
            digest = pool.submit(sha256_file, root / card.weights_file)
        sd, card = read_artifact(root)
        net = instantiate(card, sd, device)
        if digest is not None and digest.result() != card.weights_sha256:
            raise WeightsError(f"{root / card.weights_file}: sha256 {digest.result()} does not "
                               f"match the model card ({card.weights_sha256}); the file was "
                               f"changed or corrupted")
    return net, card
