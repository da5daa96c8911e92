"""Benchmark of IBIX's forward and backward mappings on the demo T1->T2 model (run: make benchmark).

Each case runs in its own process so that its peak memory is its own. For every method the script prints model
evaluations, the model work they add up to (voxels run through the model, in whole samples: tiles are smaller than a
sample) and that work as a multiple of brute force's, wall time, the best time per whole-sample evaluation measured
in the same process (same model, device and batch size), the overhead ratio wall / (work x time per evaluation),
the peak resident memory of the mapping (from just before its first run, the inputs already loaded), and agreement of
B with brute force (every block, every jitter, one block at a time) on the same blocks and jitters: Pearson r and the
largest absolute difference. Not part of the test suite; tests never assert timings.

Shared CPUs change speed from second to second, so the sides of every ratio are measured interleaved and repeated:
REPEATS times in turn (twice for the long brute-force and batched runs), the mapping, its batches replayed, one batch
of whole samples (and for the 3D volumes one whole-volume evaluation), and each is the fastest of its runs. Blocks
(SLIC) are computed once, timed on their own, and passed to every method, so the figures are those of the mapping.

The second ratio isolates IBIX's own overhead: the inputs a method ran through ONNX Runtime are recorded (shapes and
batch sizes) and replayed bare on random data, one after the other; wall / that replay time is what IBIX adds to the
model's own time for the very same inputs. The first ratio also counts that ONNX Runtime runs smaller inputs (tiles)
less efficiently per voxel than whole samples. The load average is printed at the start and the end.

    python Testing/benchmarks/benchmark_mappings.py [--quick] [--cases CASE ...] [--engine CHECKOUT] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "Resources" / "Models" / "t1_to_t2_cae.onnx"
T1 = ROOT / "Resources" / "SampleData" / "IBIX-T1.nrrd"
OUT_MASK = ROOT / "Resources" / "SampleData" / "IBIX-T1-output-mask.nrrd"
IN_MASK = ROOT / "Resources" / "SampleData" / "IBIX-T1-input-mask.nrrd"


#: runs of a fast method, the fastest reported
REPEATS = 5


def reset_peak_rss() -> None:
    """Start a new peak-memory measurement (Linux: the kernel's high-water mark of this process's RSS)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    """Peak resident memory (MiB) since :func:`reset_peak_rss` (Linux), else since the process started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_per_evaluation(model, prepared) -> float:
    """Seconds per sample at the batch size the engine uses for whole samples, excluding IBIX's own work."""
    batch = np.repeat(prepared.samples[:1], model.batch_size(prepared.sample_shape), axis=0)
    model_input = model.pipeline.to_model(batch.copy(), prepared)
    started = time.perf_counter()
    model._session_run(model_input)
    return (time.perf_counter() - started) / len(batch)


def fastest(function, repeats: int = REPEATS):
    """(fastest wall time in seconds, result of the last run) of ``repeats`` runs of ``function()``."""
    best, result = float("inf"), None
    for _ in range(repeats):
        seconds, result = timed(function)
        best = min(best, seconds)
    return best, result


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def measure(model, prepared, function, repeats: int = REPEATS, per_eval: bool = True,
            whole: bool = False, before_each=None) -> tuple[object, dict]:
    """Run ``function()`` ``repeats`` times, interleaved with what it is compared with; (result, figures).

    The first run records the batches it sends to ONNX Runtime (shapes) and gives the peak RSS (MiB) of the mapping
    (from just before it starts: the inputs are already in memory). Then, ``repeats`` times in turn: the mapping;
    the same batches replayed on random data through the model's own ONNX Runtime call (I/O binding included where
    the model uses it), one after the other as the mapping sent them; with ``per_eval`` one batch of whole samples
    at the engine's batch size (time per whole sample); with ``whole`` one evaluation of the whole volume
    (``model.predict``). Each figure is the fastest of its runs: every side saw the same machine, whatever its load.
    Before every run of the mapping the radii this process measured are forgotten, so that each run does the work
    of the first (a run in a new process), and ``before_each()`` runs (untimed), e.g. to drop cached supervoxels.
    """
    from IBIXLogic import perturb
    forget = getattr(perturb, "forget_radii", lambda: None)  # an engine without a radius cache: nothing to forget

    def fresh():
        forget()
        if before_each:
            before_each()

    session_run = model._session_run
    batches = []

    def recording(batch):
        batches.append((batch.shape, batch.dtype))
        return session_run(batch)

    model._session_run = recording
    fresh()
    reset_peak_rss()
    try:
        first, result = timed(function)
    finally:
        model._session_run = session_run
    peak = peak_rss_mib()
    rng = np.random.default_rng(0)
    data = {key: rng.random(key[0], dtype=np.float32).astype(key[1]) for key in set(batches)}

    def replay():
        for key in batches:
            session_run(data[key])

    walls, bares, evaluations, wholes = [first], [], [], []
    for turn in range(repeats):
        if turn:
            fresh()
            walls.append(timed(function)[0])
        bares.append(timed(replay)[0])
        if per_eval:
            evaluations.append(time_per_evaluation(model, prepared))
        if whole:
            evaluations_before = model.evaluations
            wholes.append(timed(lambda: model.predict_samples(prepared))[0])
            model.evaluations = evaluations_before
    return result, {"wall_s": min(walls), "per_eval_s": min(evaluations) if evaluations else None,
                    "bare_model_s": min(bares), "whole_volume_s": min(wholes) if wholes else None,
                    "peak_rss_mib": peak, "repeats": repeats}


def work(result) -> dict:
    """The result's model work against brute force's (None for an engine without it)."""
    return {"work_vs_brute_force": (getattr(result, "work", None) or {}).get("vs_brute_force"),
            "path": getattr(result, "path", None)}


def agreement(values: np.ndarray, reference: np.ndarray) -> dict:
    r = float(np.corrcoef(values.ravel(), reference.ravel())[0, 1])
    return {"pearson_r": r, "max_abs_diff": float(np.abs(values - reference).max())}


def t1_slice():
    import IBIXLogic as ibx
    volume, geometry = ibx.read_volume(T1)
    out_mask = ibx.read_mask(OUT_MASK, reference=geometry)
    k = int(np.flatnonzero(out_mask.reshape(len(out_mask), -1).any(axis=1))[0])
    image = volume[k].astype(np.float32)
    ventricle = out_mask[k]
    small = np.zeros_like(ventricle)
    centre = np.round(np.argwhere(ventricle).mean(axis=0)).astype(int)
    small[centre[0] - 2:centre[0] + 3, centre[1] - 2:centre[1] + 3] = True
    in_mask = ibx.read_mask(IN_MASK, reference=geometry)
    return volume, geometry, k, image, {"5x5": small, "ventricle": ventricle}, in_mask


def small_3d_model(folder: Path) -> Path:
    """The tests' small 3D encoder-decoder (stride 2, receptive field ~ +-7 voxels), saved with its card."""
    sys.path.insert(0, str(ROOT / "Testing"))
    import onnx_models
    return onnx_models.save(onnx_models.small_autoencoder_3d(), folder, "small3d", {
        "spatial_dims": 3, "input": {"layout": "NCDHW", "channels": ["T1"], "multiple_of": 2,
                                     "intensity": {"percentiles": [0.5, 99.5], "to": [0, 1], "clip": True}}})


def clinical_volume(shape: tuple[int, ...]) -> np.ndarray:
    """The T1 template resampled (linear) onto a grid of ``shape`` covering the same field of view."""
    import SimpleITK as sitk
    image = sitk.ReadImage(str(T1), sitk.sitkFloat32)
    reference = sitk.Image([int(n) for n in shape[::-1]], sitk.sitkFloat32)
    reference.SetSpacing([s * n / m for s, n, m in zip(image.GetSpacing(), image.GetSize(), shape[::-1])])
    reference.SetOrigin(image.GetOrigin())
    reference.SetDirection(image.GetDirection())
    return sitk.GetArrayFromImage(sitk.Resample(image, reference))


def clinical_mask(shape: tuple[int, ...]) -> np.ndarray:
    """A 5x5x5-voxel mask in the brain of :func:`clinical_volume`, off centre."""
    mask = np.zeros(shape, bool)
    c = np.asarray(shape) // 2 + np.array([0, -20, 10]) * np.asarray(shape) // 200
    mask[tuple(slice(int(v) - 2, int(v) + 3) for v in c)] = True
    return mask


def clinical_case(name: str) -> dict:
    """Forward (N = 8, 5^3 input mask) or backward (K = 2000, N = 2, 5^3 output mask, supervoxels included) of
    the small 3D model on 128^3, 160x192x192 or 300x512x512 (its card maps the T1 range 0..255 to 0..1). The
    backward map runs with its supervoxels cut anew each time, then again with them kept; on the two smaller volumes
    one whole-volume evaluation is timed between the runs, the unit of the 'no cliff' comparison."""
    import IBIXLogic as ibx
    import skimage.segmentation  # noqa: F401  (imported before the clock starts, as in a running session)
    from IBIXLogic import blocks, forward
    _, mapping, size = name.split("-")
    shape = {"128": (128, 128, 128), "160": (160, 192, 192), "300": (300, 512, 512)}[size]
    volume, mask = clinical_volume(shape), clinical_mask(shape)
    whole = size != "300"
    with tempfile.TemporaryDirectory() as folder:
        sys.path.insert(0, str(ROOT / "Testing"))
        import onnx_models
        model = ibx.load_model(onnx_models.save(onnx_models.small_autoencoder_3d(), Path(folder), "small3d", {
            "spatial_dims": 3, "input": {"layout": "NCDHW", "channels": ["T1"], "multiple_of": 2,
                                         "intensity": {"from": [0, 255], "to": [0, 1]}}}))
        prepared = model.prepare(volume)
        extra = {}
        if mapping == "forward":
            statistics = []
            real = getattr(forward, "forward_statistics")

            def timed_statistics(*args, **kwargs):
                seconds, out = timed(lambda: real(*args, **kwargs))
                statistics.append(seconds)
                return out
            forward.forward_statistics = timed_statistics
            result, figures = measure(model, prepared, lambda: ibx.forward_mapping(model, volume, mask, n_jitters=8),
                                      3, per_eval=False, whole=whole)
            forward.forward_statistics = real
            label = f"3D model on {'x'.join(map(str, shape))}: forward, N = 8, 5x5x5 input mask"
            extra = {"statistics_s": min(statistics)}
        else:
            def run():
                return ibx.backward_mapping(model, volume, mask, n_blocks=2000, n_jitters=2)
            forget = getattr(blocks, "_CACHE", {}).clear
            result, figures = measure(model, prepared, run, 3, per_eval=False, whole=whole, before_each=forget)
            again = min(timed(run)[0] for _ in range(3))
            label = (f"3D model on {'x'.join(map(str, shape))}: backward, K = 2000 supervoxels, N = 2, 5x5x5 output "
                     "mask, supervoxels included")
            extra = {"repeat_s": again, "blocks": int(result.labels.max())}
    return {"case": label, "evaluations": result.evaluations, **figures, "equivalent": result.equivalent_evaluations,
            "voxels_m": result.equivalent_evaluations * np.prod(model.pipeline.padded_shape(shape)) / 1e6,
            "radius": result.radius, "tiling": result.tiling, **work(result), **extra}


def run_case(name: str, quick: bool) -> dict:
    import IBIXLogic as ibx
    n_blocks = 150 if quick else 500
    if name.startswith("2d-"):
        _, _, _, image, masks, _ = t1_slice()
        model = ibx.load_model(MODEL)
        prepared = model.prepare(image)
        if name == "2d-forward":
            result, figures = measure(model, prepared,
                                      lambda: ibx.forward_mapping(model, image, masks["5x5"], n_jitters=8))
            return {"case": "forward, N = 8 (5x5 input mask)", "evaluations": result.evaluations, **figures,
                    "equivalent": result.equivalent_evaluations, **work(result)}
        _, mask_name, method = name.split("-", 2)
        started = time.perf_counter()
        blocks = ibx.superpixel_blocks(image, n_blocks)
        blocks_s = time.perf_counter() - started
        kwargs = {"blocks": blocks}
        labels = {"local-groups": "local, whole-sample groups (no tiles)", "local": "local (default: tiles)",
                  "progressive": "local, progressive N = 1, 2, 4", "brute": "brute force (one block at a time)",
                  "batched": "batched (every block, batched)", "coarse2": "coarse-to-fine, 2 scales (K_c = 10)",
                  "multilevel": "multilevel (10, 60, K)"}
        if method == "local-groups":
            kwargs["tiles"] = False
        elif method == "coarse2":  # these cut their own blocks, level by level
            kwargs = {"coarse_blocks": 10, "n_blocks": n_blocks}
        elif method == "multilevel":
            kwargs = {"coarse_blocks": [10, 60], "n_blocks": n_blocks}
        previews = []  # seconds to the first preview, one per run
        if method == "progressive":
            kwargs["progressive"] = True

        def run():
            marks = []
            if method == "progressive":
                kwargs["preview"] = lambda m, n: marks.append(time.perf_counter())
            started = time.perf_counter()
            result = ibx.backward_mapping(model, image, masks[mask_name], n_jitters=4,
                                          method=method if method in ("brute", "batched") else "local", **kwargs)
            if marks:
                previews.append(marks[0] - started)
            return result

        result, figures = measure(model, prepared, run, 2 if method in ("brute", "batched") else REPEATS)
        reference = ibx.backward_mapping(model, image, masks[mask_name], blocks=blocks, n_jitters=4,
                                         method="batched")
        out = {"case": f"backward, K = {n_blocks}, N = 4, {mask_name} output mask ({int(masks[mask_name].sum())} "
                       f"voxels): {labels[method]}", "evaluations": result.evaluations, **figures,
               "brute_force_evaluations": int(reference.labels.max()) * 8 + 1,
               "evaluations_per_level": result.evaluations_per_level, "radius": result.radius,
               "equivalent": result.equivalent_evaluations, "tiling": result.tiling,
               "blocks": int(result.labels.max()), **work(result)}
        if previews:
            out["first_preview_s"] = min(previews)
        if "blocks" in kwargs:
            out["blocks_s"] = blocks_s
        if method in ("coarse2", "multilevel"):
            out.update(agreement(result.map, reference.map), compared="painted maps (different blocks)")
        else:
            out.update(agreement(result.block_values, reference.block_values), compared="B per block")
        return out
    if name.startswith("volume-"):
        volume, geometry, _, _, masks, in_mask = t1_slice()
        out_mask = ibx.read_mask(OUT_MASK, reference=geometry)
        model = ibx.load_model(MODEL)
        prepared = model.prepare(volume, geometry=geometry)
        if name == "volume-forward":
            result, figures = measure(model, prepared, lambda: ibx.forward_mapping(
                model, volume, in_mask, n_jitters=8, geometry=geometry), 3)
            label = f"2D model slice by slice, whole volume {volume.shape}: forward, N = 8, ventricle input mask " \
                    f"({int(in_mask.sum())} voxels on {result.parameters['samples']} slices)"
        else:
            result, figures = measure(model, prepared, lambda: ibx.backward_mapping(
                model, volume, out_mask, n_blocks=n_blocks, n_jitters=4, geometry=geometry), 3)
            label = f"2D model slice by slice, whole volume {volume.shape}: backward, K = {n_blocks}, N = 4 " \
                    "(blocks included)"
        return {"case": label, "evaluations": result.evaluations, **figures,
                "equivalent": result.equivalent_evaluations, **work(result)}
    if name.startswith("clinical-"):
        return clinical_case(name)
    if name.startswith("3d-"):
        import SimpleITK as sitk
        image = sitk.ReadImage(str(T1), sitk.sitkFloat32)
        size = 64 if quick else 128
        reference = sitk.Image([size] * 3, sitk.sitkFloat32)
        reference.SetSpacing([s * n / size for s, n in zip(image.GetSpacing(), image.GetSize())])
        reference.SetOrigin(image.GetOrigin())
        reference.SetDirection(image.GetDirection())
        volume = sitk.GetArrayFromImage(sitk.Resample(image, reference))
        mask = np.zeros(volume.shape, bool)
        c = size // 2
        mask[c - 2:c + 3, c - 2:c + 3, c - 2:c + 3] = True
        with tempfile.TemporaryDirectory() as folder:
            model = ibx.load_model(small_3d_model(Path(folder)))
            prepared = model.prepare(volume)
            if name == "3d-forward":
                result, figures = measure(model, prepared,
                                          lambda: ibx.forward_mapping(model, volume, mask, n_jitters=8), 1)
                return {"case": f"3D model on {size}^3: forward, N = 8, 5x5x5 input mask",
                        "evaluations": result.evaluations, **figures, "equivalent": result.equivalent_evaluations,
                        **work(result)}
            started = time.perf_counter()
            blocks = ibx.superpixel_blocks(volume, n_blocks)
            blocks_s = time.perf_counter() - started
            result, figures = measure(model, prepared, lambda: ibx.backward_mapping(
                model, volume, mask, blocks=blocks, n_jitters=4), 2)
        return {"case": f"3D model on {size}^3: backward, K = {n_blocks} supervoxels, N = 4, 5x5x5 output mask",
                "evaluations": result.evaluations, **figures, "blocks_s": blocks_s,
                "brute_force_evaluations": int(result.labels.max()) * 8 + 1, "radius": result.radius,
                "equivalent": result.equivalent_evaluations, "tiling": result.tiling, **work(result)}
    raise SystemExit(f"unknown case {name}")


CASES = (["2d-forward"]
         + [f"2d-{mask}-{method}" for mask in ("5x5", "ventricle")
            for method in ("brute", "batched", "local-groups", "local", "progressive", "coarse2", "multilevel")]
         + ["volume-forward", "volume-backward", "3d-forward", "3d-backward"]
         + [f"clinical-{mapping}-{size}" for size in ("160", "300") for mapping in ("forward", "backward")]
         + ["clinical-backward-128"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer blocks and a 64^3 3D case (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--cases", nargs="+", default=None, metavar="CASE",
                        help=f"run only these cases (of {', '.join(CASES)})")
    parser.add_argument("--engine", type=Path, default=None, metavar="CHECKOUT",
                        help="import IBIXLogic from this checkout instead (e.g. an older one, for peak memory before "
                             "and after a change)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        sys.path.insert(0, str(args.engine.resolve()))
    if args.case:
        print(json.dumps(run_case(args.case, args.quick), default=str))
        return
    import onnxruntime
    results = []
    print(f"IBIX benchmark: ONNX Runtime {onnxruntime.__version__}, providers {onnxruntime.get_available_providers()}")
    import IBIXLogic as ibx
    model = ibx.load_model(MODEL)
    print(f"engine {Path(ibx.__file__).parent}; model runs on {model.device} ({model.provider}), I/O binding "
          f"{'on' if model.io_binding else 'off'}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| case | evaluations (work in whole samples) | work / brute force | wall (s) | best s/eval | overhead | "
          "IBIX overhead | peak RSS (MiB) | notes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in args.cases or CASES:
        command = [sys.executable, __file__, "--case", case] + (["--quick"] if args.quick else [])
        command += ["--engine", str(args.engine)] if args.engine else []
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            print(f"| {case} | failed: {done.stderr.strip().splitlines()[-1]} ||||||||")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(r)
        work_done = r.get("equivalent") or r["evaluations"]  # voxels run, in whole-sample units
        notes = []
        if "pearson_r" in r:
            notes.append(f"r = {r['pearson_r']:.6f}, max |dB| = {r['max_abs_diff']:.1e}")
        if "brute_force_evaluations" in r:
            notes.append(f"{r['brute_force_evaluations'] / work_done:.1f}x less model work")
        if "first_preview_s" in r:
            notes.append(f"first preview {r['first_preview_s']:.2f} s")
        if "blocks_s" in r:
            notes.append(f"blocks (SLIC, not in wall) {r['blocks_s']:.2f} s")
        if "voxels_m" in r:
            notes.append(f"{r['voxels_m']:.2f} M voxels through the model")
        if "repeat_s" in r:
            notes.append(f"again with the supervoxels kept: {r['repeat_s']:.2f} s")
        if r.get("whole_volume_s"):
            notes.append(f"one whole-volume evaluation {r['whole_volume_s']:.2f} s: wall = "
                         f"{r['wall_s'] / r['whole_volume_s']:.2f} of them")
        if "statistics_s" in r:
            notes.append(f"statistics {r['statistics_s']:.3f} s ({100 * r['statistics_s'] / r['wall_s']:.1f} %)")
        evaluations = (f"{r['evaluations']} ({r['equivalent']:.2g})" if r.get("equivalent") is not None
                       else f"{r['evaluations']}")
        per_eval = "" if r["per_eval_s"] is None else f"{r['per_eval_s'] * 1000:.2f} ms"
        overhead = "" if r["per_eval_s"] is None else f"{r['wall_s'] / (work_done * r['per_eval_s']):.2f}"
        versus = "" if r.get("work_vs_brute_force") is None else f"{r['work_vs_brute_force']:.3g}"
        print(f"| {r['case']} | {evaluations} | {versus} | {r['wall_s']:.2f} | {per_eval} | {overhead} | "
              f"{r['wall_s'] / r['bare_model_s']:.2f} | {r['peak_rss_mib']:.0f} | {'; '.join(notes)} |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
