"""Small helpers shared by the IBIX demo-model training scripts (training time only).

Needs torch, onnx, onnxruntime, SimpleITK, numpy (see README.md in this folder).
"""
import json
import os
import random
import time

import numpy as np
import SimpleITK as sitk

HERE = os.path.dirname(os.path.abspath(__file__))
RESOURCES = os.path.dirname(HERE)
MODELS = os.path.join(RESOURCES, "Models")
SAMPLES = os.path.join(RESOURCES, "SampleData")
CACHE = os.environ.get("IBIX_TRAIN_CACHE", "/tmp/ibix-train-cache")  # intermediate arrays (not shipped)


def seed_everything(seed):
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def percentile_normalise(arr, p_lo, p_hi, to_lo, to_hi, clip=True, ref=None):
    """Exactly what the card's input `intensity: {percentiles, to, clip}` means.

    The percentiles are taken on `ref` (default: `arr` itself, i.e. the whole unperturbed volume for one channel).
    Returns (normalised float32 array, (v_lo, v_hi)).
    """
    ref = arr if ref is None else ref
    v_lo, v_hi = np.percentile(ref, [p_lo, p_hi])
    if v_hi <= v_lo:
        v_hi = v_lo + 1.0
    out = (arr.astype(np.float64) - v_lo) / (v_hi - v_lo) * (to_hi - to_lo) + to_lo
    if clip:
        out = np.clip(out, min(to_lo, to_hi), max(to_lo, to_hi))
    return out.astype(np.float32), (float(v_lo), float(v_hi))


def pad_to_multiple(a, m, mode="edge"):
    """Pad the last two axes up to a multiple of m at the end (what IBIX does for `multiple_of`)."""
    h, w = a.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    pads = [(0, 0)] * (a.ndim - 2) + [(0, ph), (0, pw)]
    return np.pad(a, pads, mode=mode)


def write_like(arr, ref_img, path, pixel_type=None):
    """Write numpy array (slices, rows, cols) with ref_img's geometry, compressed (gzip level 9)."""
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref_img)
    if pixel_type is not None:
        img = sitk.Cast(img, pixel_type)
    sitk.WriteImage(img, path, True, 9)
    return os.path.getsize(path)


def export_and_verify(model, example, path, in_name, out_name, checks, rtol_abs=1e-4):
    """Export `model` (eval mode) to ONNX with dynamic batch/spatial axes, then compare onnxruntime to torch.

    checks: list of (label, np.float32 array NCHW or NCDHW). Returns dict of results.
    """
    import onnx
    import onnxruntime as ort
    import torch

    model.eval()
    # batch and spatial axes dynamic: (N, C, H, W) for 2D models, (N, C, D, H, W) for 3D ones
    axes = {0: "batch", **dict(zip(range(2, example.ndim), ["depth", "height", "width"][5 - example.ndim:]))}
    torch.onnx.export(
        model,
        (torch.from_numpy(example),),
        path,
        input_names=[in_name],
        output_names=[out_name],
        opset_version=17,
        dynamo=False,
        dynamic_axes={in_name: axes, out_name: axes},
    )
    m = onnx.load(path)
    onnx.checker.check_model(m)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    res = {"onnx_bytes": os.path.getsize(path), "checks": {}}
    for label, x in checks:
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = sess.run([out_name], {in_name: x})[0]
        diff = float(np.max(np.abs(ref - got)))
        res["checks"][label] = {"shape": list(x.shape), "max_abs_diff": diff}
        assert got.shape == ref.shape, (got.shape, ref.shape)
        assert diff < rtol_abs, (label, diff)
    return res, sess


def time_ort(sess, in_name, x, n=10):
    sess.run(None, {in_name: x})
    t = time.perf_counter()
    for _ in range(n):
        sess.run(None, {in_name: x})
    return (time.perf_counter() - t) / n


def write_card(path, card):
    with open(path, "w") as f:
        json.dump(card, f, indent=2)
        f.write("\n")
