"""ONNX Runtime's time per voxel against the batch size, on the CPU: where IBIX's CPU batch size comes from.

For the demo T1->T2 autoencoder and MRI->pseudo-CT U-Net (2D, 16^2 to 256^2 pixels) and the tests' small 3D
encoder-decoder (8^3 to 48^3 voxels), runs batches of 1 to 64 images (at most 4 M voxels) straight through the model's
ONNX Runtime session, interleaved (every batch size once, then again, ...) so that all see the same machine, and
prints the fastest time per voxel of each, marking the smallest batch within 10 % of the best, and the batch IBIX
uses (``Model.capacity``: at most CPU_BATCH_VOXELS voxels per call). Not part of the test suite.

    python Testing/benchmarks/benchmark_batches.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "Testing"))
BATCHES = (1, 2, 4, 8, 16, 32, 64)


def models(folder: Path):
    import IBIXLogic as ibx
    import onnx_models
    yield "T1->T2 autoencoder (1 channel)", ibx.load_model(ROOT / "Resources" / "Models" / "t1_to_t2_cae.onnx"), [
        (16, 16), (32, 32), (64, 64), (128, 128), (232, 200)]
    yield "MRI->pCT U-Net (3 channels)", ibx.load_model(ROOT / "Resources" / "Models" / "mri_to_pct_unet.onnx"), [
        (16, 16), (32, 32), (64, 64), (128, 128), (256, 256)]
    small = onnx_models.save(onnx_models.small_autoencoder_3d(), folder, "small3d", {
        "spatial_dims": 3, "input": {"layout": "NCDHW", "channels": ["T1"], "multiple_of": 2}})
    yield "small 3D encoder-decoder", ibx.load_model(small), [(8, 8, 8), (16, 16, 16), (32, 32, 32), (48, 48, 48)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; ns per voxel, fastest of {args.repeats}; "
          "* the smallest batch within 10 % of the best, [ ] IBIX's batch")
    print("| model | image | " + " | ".join(f"batch {b}" for b in BATCHES) + " |")
    print("|---|---|" + "---|" * len(BATCHES))
    with tempfile.TemporaryDirectory() as folder:
        for name, model, shapes in models(Path(folder)):
            channels, input_name = len(model.card.input.channels), model.card.input.name
            for shape in shapes:
                voxels = int(np.prod(shape))
                sizes = [b for b in BATCHES if b * voxels <= 2**22]
                data = {b: np.random.default_rng(0).random((b, channels) + shape, dtype=np.float32) for b in sizes}
                best = {b: float("inf") for b in sizes}
                for _ in range(args.repeats):
                    for b in sizes:
                        started = time.perf_counter()
                        model.session.run(None, {input_name: data[b]})
                        best[b] = min(best[b], (time.perf_counter() - started) / (b * voxels))
                fastest = min(best.values())
                enough = min(b for b in sizes if best[b] <= 1.1 * fastest)
                chosen = model.capacity(shape)
                cells = []
                for b in BATCHES:
                    if b not in best:
                        cells.append("")
                        continue
                    text = f"{best[b] * 1e9:.0f}" + ("*" if b == enough else "")
                    cells.append(f"[{text}]" if b == chosen else text)
                print(f"| {name} | {'x'.join(map(str, shape))} | " + " | ".join(cells) + " |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
