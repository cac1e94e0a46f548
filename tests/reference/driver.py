"""Reference side of the parity tests: runs nnInteractive's own inference session.

Run with the reference venv's interpreter (``.venv-ref/bin/python`` for nnInteractive 1.1.5,
``.venv-ref101/bin/python`` for 1.0.1), never imported by the project's own code:

    python tests/reference/driver.py JOB.json

``JOB.json`` (all paths absolute; coordinates (z, y, x) voxel indices of the original image):

    {"model": release folder, "image": .npz with "imgs" (D, H, W) and optionally "prev" (D, H, W)
     uint8 labels, "out": .npz to write, "seed": int,
     "classes": [{"label": k, "box": [[z0, z1], [y0, y1], [x0, x1]] half-open or null,
                  "clicks": [[true for fg, [z, y, x]], ...] in chronological order,
                  "probes": [[[cz, cy, cx], zoom], ...]   centres in the session's own (non-zero
                                                            cropped) coordinates,
                  "predict": true}]}

Per class, as nnInteractive's challenge script does: the previous mask ``prev == k`` as initial
segmentation (or a reset), the box, every click, all with ``run_prediction=False``. Then each probe
builds the network input at that centre and zoom with the session's own ``_build_network_input``
and runs the network; then, if ``predict``, only the newest queued centre is kept and the session
predicts. Written to ``out`` (plain arrays only): ``probe{c}_{i}_input`` (8, *patch),
``probe{c}_{i}_logits`` (2, *patch), ``flow{c}_{j}_input`` / ``_logits`` for every network call of
the prediction, ``mask{c}`` (the target buffer after class c, uint8) and ``result`` (the labels
pasted class after class); ``out`` + ``.json``: the non-zero crop, the queued centre and zoom of
each prediction, each probe's crop box, and seconds spent.
"""
import json
import sys
import time

import numpy as np
import torch


def main(job_path):
    t0 = time.perf_counter()
    job = json.load(open(job_path))
    np.random.seed(job.get("seed", 0))
    torch.manual_seed(job.get("seed", 0))
    from nnInteractive.inference.inference_session import nnInteractiveInferenceSession

    t_import = time.perf_counter() - t0
    session = nnInteractiveInferenceSession(device=torch.device("cpu"), use_torch_compile=False,
                                            verbose=False, torch_n_threads=1, do_autozoom=True,
                                            use_pinned_memory=False)
    session.initialize_from_trained_model_folder(job["model"], use_fold=0)
    data = np.load(job["image"], allow_pickle=False)
    image = data["imgs"].astype(np.float32)
    prev = data["prev"] if "prev" in data.files else None
    session.set_image(image[None])
    target = torch.zeros(image.shape, dtype=torch.uint8)
    session.set_target_buffer(target)

    calls = []
    session.network.register_forward_hook(
        lambda m, i, o: calls.append((i[0][0].detach().float().numpy().copy(), o[0].detach().float().numpy().copy())))
    arrays, meta = {}, {"classes": [], "seconds": {"import": t_import, "probes": 0.0, "predict": 0.0}}
    result = np.zeros(image.shape, np.uint8)
    for c, cls in enumerate(job["classes"]):
        k = cls["label"]
        if prev is not None:
            session.add_initial_seg_interaction((prev == k).astype(np.uint8), run_prediction=False)
        else:
            session.reset_interactions()
        if cls.get("box") is not None:
            session.add_bbox_interaction(cls["box"], include_interaction=True, run_prediction=False)
        for fg, p in cls.get("clicks", []):
            session.add_point_interaction(tuple(int(v) for v in p), include_interaction=bool(fg),
                                          run_prediction=False)
        info = {"crop_bbox": session.preprocessed_props["bbox_used_for_cropping"], "probes": []}
        t1 = time.perf_counter()
        for i, (center, zoom) in enumerate(cls.get("probes", [])):
            with torch.inference_mode():
                x, scaled_patch, scaled_bbox = session._build_network_input([int(v) for v in center], zoom)
                y = session.network(x[None].float())[0]
            calls.clear()
            arrays[f"probe{c}_{i}_input"] = x.float().numpy()
            arrays[f"probe{c}_{i}_logits"] = y.float().numpy()
            info["probes"].append({"scaled_bbox": [list(map(int, b)) for b in scaled_bbox]})
        meta["seconds"]["probes"] += time.perf_counter() - t1
        t1 = time.perf_counter()
        if cls.get("predict", True) and session.new_interaction_centers:
            session.new_interaction_centers = [session.new_interaction_centers[-1]]
            session.new_interaction_zoom_out_factors = [session.new_interaction_zoom_out_factors[-1]]
            info["center"] = [int(v) for v in session.new_interaction_centers[0]]
            info["zoom"] = float(session.new_interaction_zoom_out_factors[0])
            calls.clear()
            session._predict()
            for j, (x, y) in enumerate(calls):
                arrays[f"flow{c}_{j}_input"] = x
                arrays[f"flow{c}_{j}_logits"] = y
            info["n_calls"] = len(calls)
            arrays[f"mask{c}"] = target.numpy().copy()
            result[target.numpy() > 0] = k
        meta["seconds"]["predict"] += time.perf_counter() - t1
        meta["classes"].append(info)
    meta["seconds"]["total"] = time.perf_counter() - t0
    arrays["result"] = result
    np.savez(job["out"], **arrays)
    json.dump(meta, open(job["out"] + ".json", "w"))


if __name__ == "__main__":
    main(sys.argv[1])
