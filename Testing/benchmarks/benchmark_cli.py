"""Where ``ibix forward`` spends its time outside the mapping: start-up, loading, reading, writing, the figure.

Runs ``ibix forward`` (``python -m IBIXLogic.cli``) on the shipped cases — the T1->T2 autoencoder on the T1 volume
(ventricle mask, a tile path: the PNG predicts the shown slices) and the 3D patch demo (its sliding windows give the
PNG every output) — in a new process each time, REPEATS times, interleaved between the engines given (this checkout
and, with ``--engine``, others: e.g. an older checkout for before and after), and prints the fastest wall time of
each and, from its summary.json, the mapping's own time and the ``timings`` breakdown where the engine writes one.
Not part of the test suite.

    python Testing/benchmarks/benchmark_cli.py [--engine OLD_CHECKOUT] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA, MODELS = ROOT / "Resources" / "SampleData", ROOT / "Resources" / "Models"
CASES = {
    "T1->T2 autoencoder, T1 volume, ventricle mask, N = 8": [
        "--model", str(MODELS / "t1_to_t2_cae.onnx"), "--input", str(DATA / "IBIX-T1.nrrd"),
        "--mask", str(DATA / "IBIX-T1-input-mask.nrrd")],
    "3D patch demo, femoral head, N = 4": [
        "--model", str(MODELS / "mri_to_pct_unet3d.onnx"), "--input", str(DATA / "IBIX-Pelvis-water.nrrd"),
        "--input", str(DATA / "IBIX-Pelvis-fat.nrrd"), "--input", str(DATA / "IBIX-Pelvis-inphase.nrrd"),
        "--mask", str(DATA / "IBIX-Pelvis-input-mask.nrrd"), "--n-jitters", "4"],
}


def run(engine: Path, arguments: list[str], folder: Path) -> tuple[float, dict]:
    environment = dict(os.environ, PYTHONPATH=str(engine))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "IBIXLogic.cli", "forward", *arguments, "--output", str(folder), "-q"],
                   check=True, env=environment, cwd=engine)
    wall = time.perf_counter() - started
    return wall, json.loads((folder / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, action="append", default=[], metavar="CHECKOUT",
                        help="also run the engine of this checkout (repeat for several)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    engines = [ROOT] + [e.resolve() for e in args.engine]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; fastest of {args.repeats}, interleaved")
    print("| case | engine | wall | mapping | outside the mapping | figure (evaluations) | timings |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name, arguments in CASES.items():
            best: dict[Path, tuple[float, dict]] = {}
            for turn in range(args.repeats):
                for engine in engines:
                    wall, summary = run(engine, arguments, Path(folder) / f"{turn}-{engines.index(engine)}")
                    if engine not in best or wall < best[engine][0]:
                        best[engine] = (wall, summary)
            for engine, (wall, summary) in best.items():
                mapping = summary["forward"]["seconds"]
                figure = summary.get("figure") or {}
                timings = summary.get("timings")
                shown = "" if timings is None else ", ".join(f"{k} {v}" for k, v in timings.items() if v is not None)
                print(f"| {name} | {engine.name} | {wall:.2f} s | {mapping:.2f} s | {wall - mapping:.2f} s | "
                      f"{figure.get('seconds', 0):.2f} s ({figure.get('evaluations', '?')}) | {shown} |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
