"""How well IBIX says a run's cost before it runs: predicted against actual evaluations and time.

For a few long and short cases (the demo T1->T2 slice, backward with every block; the whole T1 volume slice by slice;
the 3D patch demo's forward and backward maps; the small 3D model on 160x192x192), prints what ``ibx.estimate``
costs and predicts, and what the run then reports in its own estimate (``estimate=`` callback: the same plan, its
first timed batches) against its actual evaluations and wall time. Evaluation counts are exact; times depend on
the machine's load, which is printed. Not part of the test suite.

    python Testing/benchmarks/benchmark_estimate.py [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "Testing"))


def cases(folder: Path):
    """(name, mapping, arguments, parameters) of each case."""
    import IBIXLogic as ibx
    import onnx_models
    from benchmark_mappings import MODEL, OUT_MASK, clinical_mask, clinical_volume, t1_slice
    from IBIXLogic.demo import DEMOS

    volume, geometry, _, image, masks, _ = t1_slice()
    cae = ibx.load_model(MODEL)
    yield ("slice: backward, every block (batched), K = 500, N = 4", ibx.backward_mapping,
           (cae, image, masks["ventricle"]), dict(n_blocks=500, n_jitters=4, method="batched"))
    yield ("slice: backward, K = 500, N = 4 (local)", ibx.backward_mapping, (cae, image, masks["ventricle"]),
           dict(n_blocks=500, n_jitters=4))
    yield ("volume 156x233x197: backward, K = 500, N = 4", ibx.backward_mapping,
           (cae, volume, ibx.read_mask(OUT_MASK, reference=geometry)), dict(n_blocks=500, n_jitters=4,
                                                                            geometry=geometry))
    case = next(c for c in DEMOS if c.name == "mri_to_pct_3d")
    data = ROOT / "Resources" / "SampleData"
    patch = ibx.load_model(ROOT / "Resources" / "Models" / case.model)
    pelvis = [ibx.read_volume(data / name) for name in case.inputs]
    x, pelvis_geometry = [v[0] for v in pelvis], pelvis[0][1]
    yield ("3D patch demo: forward, N = 4", ibx.forward_mapping,
           (patch, x, ibx.read_mask(data / case.input_mask, reference=pelvis_geometry)),
           dict(n_jitters=4, geometry=pelvis_geometry))
    yield ("3D patch demo: backward, K = 40, N = 1", ibx.backward_mapping,
           (patch, x, ibx.read_mask(data / case.output_mask, reference=pelvis_geometry)),
           dict(n_blocks=40, n_jitters=1, method="batched", geometry=pelvis_geometry))
    small = ibx.load_model(onnx_models.save(onnx_models.small_autoencoder_3d(), folder, "small3d", {
        "spatial_dims": 3, "input": {"layout": "NCDHW", "channels": ["T1"], "multiple_of": 2,
                                     "intensity": {"from": [0, 255], "to": [0, 1]}}}))
    shape = (160, 192, 192)
    clinical = clinical_volume(shape)
    mask = clinical_mask(shape)
    yield ("3D model on 160x192x192: backward, K = 2000, N = 2", ibx.backward_mapping, (small, clinical, mask),
           dict(n_blocks=2000, n_jitters=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    import IBIXLogic as ibx
    from IBIXLogic.perturb import forget_radii
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| case | ibx.estimate: its own time, predicted evaluations, time | the run's estimate: evaluations, time "
          "| actual: evaluations, wall | predicted / actual time |")
    print("|---|---|---|---|---|")
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name, mapping, arguments, parameters in cases(Path(folder)):
            forget_radii()
            started = time.perf_counter()
            alone = ibx.estimate(mapping, *arguments, **parameters)
            alone_s = time.perf_counter() - started
            forget_radii()  # the run measures its radius again, as in a new process
            found = []
            started = time.perf_counter()
            result = mapping(*arguments, estimate=found.append, **parameters)
            wall = time.perf_counter() - started
            row = {"case": name, "estimate_s": alone_s, "estimate_evaluations": alone.evaluations,
                   "estimate_seconds": alone.seconds, "run_estimate_evaluations": found[0].evaluations,
                   "run_estimate_seconds": found[0].seconds, "evaluations": result.evaluations, "wall_s": wall}
            results.append(row)
            print(f"| {name} | {alone_s:.2f} s: {alone.evaluations}, {alone.seconds:.2f} s | "
                  f"{found[0].evaluations}, {found[0].seconds:.2f} s | {result.evaluations}, {wall:.2f} s | "
                  f"{alone.seconds / wall:.2f}, {found[0].seconds / wall:.2f} |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
