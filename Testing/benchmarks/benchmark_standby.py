"""One standby engine process serving many jobs, as the Slicer module's does through a session: its memory and maps.

The module keeps one engine process (``IBIXLib/child.py serve``) and hands it every run, one after the other. This
script hands one such process ``--jobs`` jobs (default 20) in turns over four demo jobs on three models (one more
than the ONNX Runtime session cache keeps): the T1 forward map (N = 8) and backward map (K = 100, N = 2) of the
autoencoder, and the pelvis forward maps of the 2D U-Net and of the 3D patch U-Net in sliding windows (N = 4). It
prints, after each job, the process's resident memory (RSS, read once the job has ended and the process has
collected its garbage), the job's wall time, evaluations and response-radius source, and whether the job's map is,
bit for bit, the map the same job gave the first time. Not part of the test suite.

    python Testing/benchmarks/benchmark_standby.py [--jobs 20] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "IBIX")]
MODELS = ROOT / "Resources" / "Models"
DATA = ROOT / "Resources" / "SampleData"
PELVIS = [str(DATA / f"IBIX-Pelvis-{name}.nrrd") for name in ("water", "fat", "inphase")]

#: The demo jobs handed in turns: (name, ibix arguments without --output, the map's file role).
JOBS = (
    ("T1 forward", ["forward", "--model", str(MODELS / "t1_to_t2_cae.onnx"), "--input", str(DATA / "IBIX-T1.nrrd"),
                    "--mask", str(DATA / "IBIX-T1-input-mask.nrrd"), "--label", "1", "--n-jitters", "8"],
     "forward_signed"),
    ("T1 backward", ["backward", "--model", str(MODELS / "t1_to_t2_cae.onnx"), "--input", str(DATA / "IBIX-T1.nrrd"),
                     "--out-mask", str(DATA / "IBIX-T1-output-mask.nrrd"), "--out-label", "1", "--n-blocks", "100",
                     "--n-jitters", "2"], "backward"),
    ("pelvis 2D forward", ["forward", "--model", str(MODELS / "mri_to_pct_unet.onnx"),
                           *[a for path in PELVIS for a in ("--input", path)],
                           "--mask", str(DATA / "IBIX-Pelvis-input-mask.nrrd"), "--label", "1", "--n-jitters", "4"],
     "forward_signed"),
    ("pelvis 3D forward", ["forward", "--model", str(MODELS / "mri_to_pct_unet3d.onnx"),
                           *[a for path in PELVIS for a in ("--input", path)],
                           "--mask", str(DATA / "IBIX-Pelvis-input-mask.nrrd"), "--label", "1", "--n-jitters", "4"],
     "forward_signed"),
)

#: Seconds between a job's end and the memory reading (the process collects its garbage after the job).
SETTLE = 0.5


def main() -> int:
    import numpy as np
    import psutil

    import IBIXLogic as ibx
    from IBIXLib import jobs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    standby = jobs.Standby("cpu", jobs.subprocess_launcher, sys.executable)
    engine = psutil.Process(standby.process._proc.pid)
    rows, first_maps = [], {}
    try:
        time.sleep(3.0)  # its imports
        rows.append({"job": 0, "name": "(started, engine imported)", "rss_mib": engine.memory_info().rss / 2**20})
        with tempfile.TemporaryDirectory() as folder:
            for number in range(1, args.jobs + 1):
                name, arguments, role = JOBS[(number - 1) % len(JOBS)]
                out = str(Path(folder) / f"job{number}")
                started = time.perf_counter()
                job = standby.serve([*arguments, "--device", "cpu", "--no-png", "--quiet", "--progress-format",
                                     "jsonl", "--output", out])
                if jobs.wait(job, interval=0.01) != jobs.FINISHED:
                    raise SystemExit(f"job {number} ({name}): {job.state}: {job.error}")
                seconds = time.perf_counter() - started
                summary = json.loads(Path(job.record["files"]["summary"]).read_text())
                section = summary[arguments[0]]
                the_map = ibx.read_volume(job.record["files"][role])[0]
                same = bool(np.array_equal(the_map, first_maps.setdefault(name, the_map)))
                time.sleep(SETTLE)
                rows.append({"job": number, "name": name, "seconds": round(seconds, 3),
                             "evaluations": section["evaluations"],
                             "radius_source": (section.get("path") or {}).get("radius_source"),
                             "same_map_as_first": same, "rss_mib": engine.memory_info().rss / 2**20})
                if standby.take() is None:
                    raise SystemExit(f"the engine process did not go on after job {number}")
    finally:
        standby.stop()
    print(f"{'job':>3}  {'':18} {'time':>7} {'evals':>6}  {'radius':12} {'same map':9} {'RSS':>9}")
    for row in rows:
        if row["job"] == 0:
            print(f"{0:>3}  {row['name']:34} {'':>20} {row['rss_mib']:7.0f} MiB")
            continue
        print(f"{row['job']:>3}  {row['name']:18} {row['seconds']:6.2f}s {row['evaluations']:>6}  "
              f"{str(row['radius_source']).split(' (')[0]:12} {'yes' if row['same_map_as_first'] else 'NO':9} "
              f"{row['rss_mib']:7.0f} MiB")
    after = [row["rss_mib"] for row in rows[1:]]
    cycle = len(JOBS)
    print(f"RSS after the first {cycle} jobs: {max(after[:cycle]):.0f} MiB at most; after the last {cycle}: "
          f"{max(after[-cycle:]):.0f} MiB at most")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(row.get("same_map_as_first", True) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
