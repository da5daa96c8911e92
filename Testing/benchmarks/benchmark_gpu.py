"""The README's speed cases on an NVIDIA GPU (run: make benchmark-gpu); prints "no GPU" where there is none.

When ONNX Runtime offers its CUDA provider, runs on the GPU, each with ONNX Runtime's I/O binding on and off
(``model.io_binding``): the demo T1->T2 autoencoder on axial slice 93 (forward N = 8 of a 5x5 mask; backward
K = 500, N = 4 of the ventricle, the blocks cut once), the whole demo volume slice by slice (forward of the ventricle
mask, N = 8), and the small 3D model on 160x192x192 (forward N = 8 and backward K = 2000, N = 2 of a 5x5x5 mask).
For each: model evaluations, the fastest wall time of REPEATS runs, interleaved (binding on, off, on, off, ...) so that
both see the same machine, milliseconds per slice of model work (wall / whole-slice equivalents), the batch memory budget the
GPU's free memory gives (half of it), and the largest difference between the two maps. Not part of the test suite.

    python Testing/benchmarks/benchmark_gpu.py [--repeats 5] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "Testing"))


def cuda_available() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def cases(folder: Path):
    """(name, model, run(model) -> result) of the README's cases."""
    import IBIXLogic as ibx
    import onnx_models
    from benchmark_mappings import MODEL, clinical_mask, clinical_volume, t1_slice

    volume, geometry, _, image, masks, in_mask = t1_slice()
    blocks = ibx.superpixel_blocks(image, 500)
    cae = ibx.load_model(MODEL, device="cuda")
    yield "slice 233x197: forward, N = 8, 5x5 mask", cae, lambda m: ibx.forward_mapping(m, image, masks["5x5"],
                                                                                         n_jitters=8)
    yield "slice 233x197: backward, K = 500, N = 4, ventricle", cae, lambda m: ibx.backward_mapping(
        m, image, masks["ventricle"], blocks=blocks, n_jitters=4)
    yield "volume 156x233x197 slice by slice: forward, N = 8, ventricle", cae, lambda m: ibx.forward_mapping(
        m, volume, in_mask, n_jitters=8, geometry=geometry)
    small = ibx.load_model(onnx_models.save(onnx_models.small_autoencoder_3d(), folder, "small3d", {
        "spatial_dims": 3, "input": {"layout": "NCDHW", "channels": ["T1"], "multiple_of": 2,
                                     "intensity": {"from": [0, 255], "to": [0, 1]}}}), device="cuda")
    shape = (160, 192, 192)
    clinical = clinical_volume(shape)
    mask = clinical_mask(shape)
    yield "3D model on 160x192x192: forward, N = 8, 5x5x5 mask", small, lambda m: ibx.forward_mapping(
        m, clinical, mask, n_jitters=8)
    yield "3D model on 160x192x192: backward, K = 2000, N = 2, 5x5x5 mask", small, lambda m: ibx.backward_mapping(
        m, clinical, mask, n_blocks=2000, n_jitters=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    if not cuda_available():
        print("no GPU: ONNX Runtime offers no CUDAExecutionProvider here (install onnxruntime-gpu on a machine with "
              "an NVIDIA GPU); nothing was measured")
        return
    import onnxruntime
    print(f"ONNX Runtime {onnxruntime.__version__} on CUDA")
    print("| case | evaluations (work) | batch memory budget | wall, binding on | wall, binding off | "
          "ms per slice of work (on, off) | max diff |")
    print("|---|---|---|---|---|---|---|")
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name, model, run in cases(Path(folder)):
            best = {True: float("inf"), False: float("inf")}
            maps = {}
            for _ in range(args.repeats):  # interleaved: both settings see the same machine
                for binding in (True, False):
                    model.io_binding = binding
                    started = time.perf_counter()
                    result = run(model)
                    best[binding] = min(best[binding], time.perf_counter() - started)
                    maps[binding] = result.signed if hasattr(result, "signed") else result.block_values
            work = max(result.equivalent_evaluations, 1e-9)
            difference = float(np.abs(maps[True] - maps[False]).max())
            row = {"case": name, "evaluations": result.evaluations, "work": work, "wall_on_s": best[True],
                   "wall_off_s": best[False], "memory_budget_mib": model.memory_budget / 2**20,
                   "max_diff": difference}
            results.append(row)
            print(f"| {name} | {result.evaluations} ({work:.3g}) | budget {row['memory_budget_mib']:.0f} MiB | "
                  f"{best[True]:.3f} s | {best[False]:.3f} s | {1000 * best[True] / work:.2f}, "
                  f"{1000 * best[False] / work:.2f} | {difference:.1e} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
