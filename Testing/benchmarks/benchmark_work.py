"""Model work of IBIX against brute force on common generator architectures (counts, not times).

For each generator of ``Testing/onnx_models.py`` (``GENERATORS``: random weights; built with onnx.helper into a
temporary folder) on a 256x256 image (the demo T1 slice resampled; three channels for pix2pix's U-Net-256), runs
IBIX's forward map of a 5x5 input mask (N = 4 and N = 8) and backward map of a 5x5 output mask (K = 100 and K = 64 blocks, N = 1), each
twice: first as in a new process (the radii measured so far forgotten), measuring the response radius where that
can pay for itself, then again in the same process, which may reuse it. Prints the model work (voxels run through the model, in whole images) as a multiple of brute force's
(forward: 1 + 2N whole images per slice; backward: 1 + 2N per block), the path taken and why, and the largest
difference from the brute-force map (method "whole" / "batched" on the same blocks and jitters). Model work is
counted exactly by the engine; nothing here depends on the machine's speed or load.

    python Testing/benchmarks/benchmark_work.py [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import onnx_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
T1 = ROOT / "Resources" / "SampleData" / "IBIX-T1.nrrd"
SIZE = 256


def image_256(channels: int) -> list[np.ndarray]:
    """Axial slice 93 of the T1 sample resampled to 256x256 (linear); extra channels are smooth variations."""
    import IBIXLogic as ibx
    from scipy import ndimage
    volume, _ = ibx.read_volume(T1)
    image = volume[93].astype(np.float32)
    image = ndimage.zoom(image, (SIZE / image.shape[0], SIZE / image.shape[1]), order=1)[:SIZE, :SIZE]
    return [image] + [np.sqrt(np.abs(image)) * (c + 1) * 8 for c in range(channels - 1)]


def box(centre: tuple[int, int], half: int = 2) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[centre[0] - half:centre[0] + half + 1, centre[1] - half:centre[1] + half + 1] = True
    return mask


def describe(result) -> str:
    path = result.to_dict().get("path") or {}
    if path:
        return f"{path.get('method')}: {path.get('reason')}; radius {path.get('radius_source')}"
    tiling = result.tiling or {}
    return f"tiles {tiling.get('tiles')} ({tiling.get('reason', '')})"


def run(name: str, folder: Path) -> list[dict]:
    import IBIXLogic as ibx
    from IBIXLogic.perturb import forget_radii
    model = ibx.load_model(onnx_models.save_generator(name, folder))
    channels = len(model.card.input.channels)
    images = image_256(channels)
    x = images[0] if channels == 1 else images
    sample = model.pipeline.sample_voxels((SIZE, SIZE))
    rows = []
    mask = box((118, 140))
    for n in (4, 8):
        for attempt in ("first", "again"):
            if attempt == "first":
                forget_radii()
            result = ibx.forward_mapping(model, x, mask, n_jitters=n)
            work = result.equivalent_evaluations
            brute = 1 + 2 * n
            row = {"model": name, "mapping": f"forward N = {n}", "run": attempt, "evaluations": result.evaluations,
                   "work": work, "brute_force": brute, "ratio": work / brute, "path": describe(result)}
            if attempt == "first":
                reference = ibx.forward_mapping(model, x, mask, n_jitters=n, method="whole")
                row["max_abs_diff"] = float(np.abs(result.signed - reference.signed).max() /
                                            max(float(np.abs(reference.signed).max()), 1e-30))
            rows.append(row)
    for k in (100, 64):
        blocks = ibx.superpixel_blocks(np.stack(images) if channels > 1 else images[0], k,
                                       channel_axis=0 if channels > 1 else None)
        for attempt in ("first", "again"):
            if attempt == "first":
                forget_radii()
            result = ibx.backward_mapping(model, x, mask, blocks=blocks, n_jitters=1)
            brute = 1 + 2 * int(blocks.max())
            row = {"model": name, "mapping": f"backward K = {k} ({int(blocks.max())} blocks), N = 1", "run": attempt,
                   "evaluations": result.evaluations, "work": result.equivalent_evaluations, "brute_force": brute,
                   "ratio": result.equivalent_evaluations / brute, "path": describe(result)}
            if attempt == "first":
                reference = ibx.backward_mapping(model, x, mask, blocks=blocks, n_jitters=1, method="batched")
                row["max_abs_diff"] = float(np.abs(result.block_values - reference.block_values).max())
            rows.append(row)
    del sample
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--models", nargs="+", default=list(onnx_models.GENERATORS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    results = []
    print("| generator | mapping | run | evaluations | model work (whole images) | brute force | work / brute force "
          "| path | max diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            for row in run(name, Path(folder)):
                results.append(row)
                diff = f"{row['max_abs_diff']:.1e}" if "max_abs_diff" in row else ""
                print(f"| {onnx_models.GENERATORS[name][2]} | {row['mapping']} | {row['run']} | {row['evaluations']} | "
                      f"{row['work']:.2f} | {row['brute_force']} | **{row['ratio']:.2f}** | {row['path']} | {diff} |",
                      flush=True)
    worst = max(r["ratio"] for r in results)
    print(f"largest work / brute force: {worst:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
