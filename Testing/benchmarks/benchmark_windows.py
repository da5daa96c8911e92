"""Benchmark of IBIX on a model run in sliding windows: the 3D MRI->pseudo-CT patch demo on the pelvis sample.

For the forward map of the shipped input mask and the backward map of the shipped output mask (the demo's
parameters; supervoxels computed once and given to IBIX, so that both sides time the mapping only), prints the
window evaluations and wall time of IBIX (only the windows a perturbation touches run again) and of brute force
(every jittered input through the whole windowed pipeline, with the intensity mapping fixed on the unperturbed
input as IBIX fixes it, and the equations of the maps written out here), and their agreement (largest difference
relative to the largest value, Pearson r). Not part of the test suite; tests never assert timings.

    python Testing/benchmarks/benchmark_windows.py [--json results.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

import IBIXLogic as ibx
from IBIXLogic.blocks import superpixel_blocks
from IBIXLogic.demo import DEMOS
from IBIXLogic.perturb import jitter_levels

ROOT = Path(__file__).resolve().parents[2]
CASE = next(c for c in DEMOS if c.name == "mri_to_pct_3d")


def brute_force_response(model, prepared, direction, levels, base):
    """F along ``direction`` (the 3D sample grid) from its definition, (1/2N) sum_k (f(x + h_k d) - f(x)) / h_k,
    every f through the whole windowed pipeline (``Model.predict_samples``: all windows, blended)."""
    total = np.zeros(base.shape)
    for h in levels:
        jittered = dataclasses.replace(prepared, samples=prepared.samples + np.float32(h) * direction)
        total += (model.predict_samples(jittered)[0] - base) / h
    return total / len(levels)


def agreement(values, reference) -> dict:
    scale = float(np.abs(reference).max())
    return {"max_abs_diff_relative": float(np.abs(values - reference).max()) / scale,
            "r": float(np.corrcoef(values.ravel(), reference.ravel())[0, 1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    data = ROOT / "Resources" / "SampleData"
    model = ibx.load_model(ROOT / "Resources" / "Models" / CASE.model)
    volumes = [ibx.read_volume(data / name) for name in CASE.inputs]
    x, geometry = [v[0].astype(np.float32) for v in volumes], volumes[0][1]
    in_mask = ibx.read_mask(data / CASE.input_mask, reference=geometry)
    out_mask = ibx.read_mask(data / CASE.output_mask, reference=geometry)
    results = {}
    prepared = model.prepare(x, geometry)  # a 3D model: one sample, the volume itself

    forward_params, backward_params = CASE.params["forward"], CASE.params["backward"]
    forward = ibx.forward_mapping(model, x, in_mask, geometry=geometry, **forward_params)
    h = forward.parameters["max_jitter"]
    started, before = time.perf_counter(), model.evaluations
    base = model.predict_samples(prepared)[0]
    levels = jitter_levels(forward_params["n_jitters"], h)
    reference = brute_force_response(model, prepared, in_mask.astype(np.float32), levels, base)
    results["forward"] = {"ibix": {"window_evaluations": forward.evaluations, "seconds": round(forward.seconds, 1)},
                          "brute_force": {"window_evaluations": model.evaluations - before,
                                          "seconds": round(time.perf_counter() - started, 1)},
                          "agreement": agreement(forward.signed, reference)}

    params = {k: v for k, v in backward_params.items() if k != "n_blocks"}
    labels = superpixel_blocks(prepared.samples[0], backward_params["n_blocks"], spacing=prepared.sample_spacing,
                               channel_axis=0)
    backward = ibx.backward_mapping(model, x, out_mask, geometry=geometry, blocks=labels, **params)
    started, before = time.perf_counter(), model.evaluations
    levels = jitter_levels(backward_params["n_jitters"], backward.parameters["max_jitter"])
    numerators = []
    for label in range(1, int(labels.max()) + 1):
        response = np.abs(brute_force_response(model, prepared, (labels == label).astype(np.float32), levels,
                                               base))
        numerators.append(response[out_mask].sum())
    numerators = np.array(numerators)
    reference = numerators / numerators.max()  # "magnitude" normalisation
    ibix_values = np.array([backward.map[labels == k][0] for k in range(1, int(labels.max()) + 1)])
    results["backward"] = {"blocks": len(numerators),  # SLIC gives fewer supervoxels than asked for
                           "ibix": {"window_evaluations": backward.evaluations,
                                    "seconds": round(backward.seconds, 1)},
                           "brute_force": {"window_evaluations": model.evaluations - before
                                           + backward.parameters["windows"]["windows_per_sample"],  # f(x)
                                           "seconds": round(time.perf_counter() - started, 1)},
                           "agreement": agreement(ibix_values, reference)}
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
