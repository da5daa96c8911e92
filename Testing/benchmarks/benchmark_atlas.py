"""Benchmark of the response atlas (run: make benchmark): build cost against one backward mapping, and answer time.

Three cases, each in its own process so that its peak memory (RSS) is its own: the demo T1->T2 autoencoder on the
demo slice (the slice of benchmark_mappings.py), the same 2D model slice by slice on the whole demo volume, and the
tests' small 3D encoder-decoder on the T1 resampled to 160x192x192. For each: one backward mapping (the default
exact local path, on the atlas's blocks, N = 4) with its evaluations and wall time; the atlas build with its
evaluations, model work in whole samples, wall time and memory (on the slice, builds and backward mappings
alternate three times and the fastest of each is reported); and the time of an atlas answer (the whole
ResponseAtlas.backward call: mask check, sums, B painted on the grid), fastest of several, for a few output masks,
with the largest difference in B from backward_mapping. Not part of the test suite; tests never assert timings.

    python Testing/benchmarks/benchmark_atlas.py [--quick] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_mappings import MODEL, OUT_MASK, T1, fastest, peak_rss_mib, small_3d_model, t1_slice  # noqa: E402
from IBIXLogic.perturb import forget_radii  # noqa: E402

#: the whole-volume atlas holds every slice's responses (about 1.1 GiB for the demo volume at K = 500)
VOLUME_BUDGET = 3 * 2**30


def resampled_t1(shape: tuple[int, int, int]) -> np.ndarray:
    """The demo T1 resampled onto a grid of ``shape`` (slices, rows, cols) covering the same extent."""
    import SimpleITK as sitk
    image = sitk.ReadImage(str(T1), sitk.sitkFloat32)
    size = list(reversed(shape))
    reference = sitk.Image(size, sitk.sitkFloat32)
    reference.SetSpacing([s * n / m for s, n, m in zip(image.GetSpacing(), image.GetSize(), size)])
    reference.SetOrigin(image.GetOrigin())
    reference.SetDirection(image.GetDirection())
    return sitk.GetArrayFromImage(sitk.Resample(image, reference))


def centred_box(shape, half: int) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(c - half, c + half + 1) for c in np.asarray(shape) // 2)] = True
    return mask


def run_case(name: str, quick: bool) -> dict:
    import IBIXLogic as ibx
    n_blocks = 150 if quick else 500
    geometry, budget, folder = None, ibx.atlas.DEFAULT_ATLAS_BUDGET, None
    if name == "slice":
        _, _, k, x, masks, _ = t1_slice()
        model = ibx.load_model(MODEL)
        masks = {"ventricle": masks["ventricle"], "5x5": masks["5x5"], "head (1/4 of the slice)":
                 x > np.percentile(x, 75)}
        reference_mask = "ventricle"
        label = f"demo slice {k} ({x.shape[0]}x{x.shape[1]})"
        blocks = ibx.superpixel_blocks(x, n_blocks)
    elif name == "volume":
        volume, geometry, _, _, _, _ = t1_slice()
        x = volume
        out_mask = ibx.read_mask(OUT_MASK, reference=geometry)
        model = ibx.load_model(MODEL)
        masks = {"ventricle": out_mask, "a 5x5 box on the middle slice": centred_box(x.shape, 2) & (
            np.arange(x.shape[0]) == x.shape[0] // 2)[:, None, None]}
        reference_mask = "ventricle"
        label = f"demo volume {x.shape}, 2D model slice by slice"
        blocks = "slic"
        budget = VOLUME_BUDGET
    else:
        shape = (64, 64, 64) if quick else (160, 192, 192)
        x = resampled_t1(shape)
        folder = tempfile.TemporaryDirectory()
        model = ibx.load_model(small_3d_model(Path(folder.name)))
        masks = {"5x5x5": centred_box(shape, 2), "a centred box, 1/8 of each side": centred_box(shape, shape[0] // 8),
                 "the brighter half of the volume": x > np.median(x)}
        reference_mask = "5x5x5"
        label = f"3D model on {shape[0]}x{shape[1]}x{shape[2]}"
        blocks = ibx.superpixel_blocks(x, n_blocks)

    def build():  # each run measures the response radius, as in a new process
        forget_radii()
        return ibx.block_response_atlas(model, x, blocks=blocks, n_blocks=n_blocks, n_jitters=4, geometry=geometry,
                                        memory_budget=budget)

    def backward_mapping():
        forget_radii()
        return ibx.backward_mapping(model, x, masks[reference_mask], blocks=atlas.labels, n_jitters=4,
                                    geometry=geometry)

    # build and backward mapping alternate, fastest of each: a shared CPU changes speed from second to second
    build_s, atlas = fastest(build, 1)
    peak = peak_rss_mib()
    backward_s, backward = fastest(backward_mapping, 1)
    for _ in range(2 if name == "slice" else 0):
        build_s = min(build_s, fastest(build, 1)[0])
        backward_s = min(backward_s, fastest(backward_mapping, 1)[0])
    queries = {}
    for mask_name, mask in masks.items():
        answer_s, answer = fastest(lambda: atlas.backward(mask), 20 if name == "slice" else 7)
        queries[mask_name] = {"ms": answer_s * 1000, "voxels": int(mask.sum())}
        if mask_name == reference_mask:
            queries[mask_name]["max_abs_diff"] = float(np.abs(answer.block_values - backward.block_values).max())
    if folder is not None:
        folder.cleanup()
    return {"case": label, "blocks": atlas.n_blocks, "backward_mask": reference_mask,
            "backward_evaluations": backward.evaluations, "backward_equivalent": backward.equivalent_evaluations,
            "backward_s": backward_s, "atlas_evaluations": atlas.evaluations,
            "atlas_equivalent": atlas.equivalent_evaluations, "atlas_s": build_s, "atlas_mib": atlas.nbytes / 2**20,
            "entries": int(len(atlas.values)), "peak_rss_mib": peak, "radius": atlas.radius["radius"],
            "tiling": atlas.tiling, "queries": queries}


CASES = ["slice", "volume", "3d"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer blocks and a 64^3 3D case (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES, help="which cases to run")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.quick)))
        return
    results = []
    print(f"IBIX response atlas benchmark (K = {150 if args.quick else 500} blocks per sample, N = 4)")
    print("| case | one backward mapping: evaluations (work), wall | atlas build: evaluations (work), wall, "
          "memory, peak RSS | build / backward | answers (fastest) |")
    print("|---|---|---|---|---|")
    for case in args.cases:
        command = [sys.executable, __file__, "--case", case] + (["--quick"] if args.quick else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            print(f"| {case} | failed: {done.stderr.strip().splitlines()[-1]} ||||")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(r)
        answers = "; ".join(f"{name} ({q['voxels']} voxels): {q['ms']:.1f} ms"
                            + (f", max dB {q['max_abs_diff']:.0e}" if "max_abs_diff" in q else "")
                            for name, q in r["queries"].items())
        print(f"| {r['case']}, {r['blocks']} blocks | {r['backward_mask']} mask: {r['backward_evaluations']} "
              f"({r['backward_equivalent']:.0f}), {r['backward_s']:.2f} s | {r['atlas_evaluations']} "
              f"({r['atlas_equivalent']:.0f}), {r['atlas_s']:.2f} s, {r['atlas_mib']:.0f} MiB, "
              f"{r['peak_rss_mib']:.0f} MiB | {r['atlas_s'] / r['backward_s']:.1f}x time, "
              f"{r['atlas_equivalent'] / r['backward_equivalent']:.1f}x work | {answers} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
