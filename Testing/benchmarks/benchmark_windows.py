"""Benchmark of IBIX on a model run in sliding windows: the 3D MRI->pseudo-CT patch demo on the pelvis sample.

For the forward map of the shipped input mask and the backward map of the shipped output mask (the demo's
parameters), prints the window evaluations and wall time of IBIX (only the windows a perturbation touches run
again) and of brute force (every jittered input through the whole windowed pipeline, ``Model.predict``, and the
equations of the maps written out here), and their agreement (largest difference relative to the largest value,
Pearson r). Not part of the test suite; tests never assert timings.

    python Testing/benchmarks/benchmark_windows.py [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import IBIXLogic as ibx
from IBIXLogic.demo import DEMOS
from IBIXLogic.perturb import jitter_levels

ROOT = Path(__file__).resolve().parents[2]
CASE = next(c for c in DEMOS if c.name == "mri_to_pct_3d")


def brute_force_response(model, x, geometry, direction, levels, base):
    """F along ``direction`` from its definition, (1/2N) sum_k (f(x + h_k d) - f(x)) / h_k, every f through the
    whole windowed pipeline."""
    total = np.zeros(base.shape)
    for h in levels:
        total += (model.predict([c + np.float32(h) * direction for c in x], geometry) - base) / h
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

    forward_params, backward_params = CASE.params["forward"], CASE.params["backward"]
    forward = ibx.forward_mapping(model, x, in_mask, geometry=geometry, **forward_params)
    h = forward.parameters["max_jitter"]
    started, before = time.perf_counter(), model.evaluations
    base = model.predict(x, geometry)
    levels = jitter_levels(forward_params["n_jitters"], h)
    reference = brute_force_response(model, x, geometry, in_mask.astype(np.float32), levels, base)
    results["forward"] = {"ibix": {"window_evaluations": forward.evaluations, "seconds": round(forward.seconds, 1)},
                          "brute_force": {"window_evaluations": model.evaluations - before,
                                          "seconds": round(time.perf_counter() - started, 1)},
                          "agreement": agreement(forward.signed, reference)}

    backward = ibx.backward_mapping(model, x, out_mask, geometry=geometry, **backward_params)
    started, before = time.perf_counter(), model.evaluations
    levels = jitter_levels(backward_params["n_jitters"], backward.parameters["max_jitter"])
    numerators = []
    for label in range(1, int(backward.labels.max()) + 1):
        response = np.abs(brute_force_response(model, x, geometry, (backward.labels == label).astype(np.float32),
                                               levels, base))
        numerators.append(response[out_mask].sum())
    numerators = np.array(numerators)
    reference = numerators / numerators.max()  # "magnitude" normalisation
    results["backward"] = {"blocks": len(numerators),
                           "ibix": {"window_evaluations": backward.evaluations,
                                    "seconds": round(backward.seconds, 1)},
                           "brute_force": {"window_evaluations": model.evaluations - before
                                           + backward.parameters["windows"]["windows_per_sample"],  # f(x)
                                           "seconds": round(time.perf_counter() - started, 1)},
                           "agreement": agreement(backward.block_values[1:], reference)}
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
