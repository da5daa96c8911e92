"""Reliability: the seeded fault campaign (``Testing/faults.py``): damaged files of every format, result folders
of earlier runs, kills and interrupts at seeded points of forward, backward, atlas and cohort runs, a full disk,
concurrent runs on one folder, non-deterministic models, damaged atlases and misleading messages.

Every case must end in a clear error or a correct result, and every result folder must describe itself: 0 raw
outcomes, 0 wrong results, 0 partial folders. The tally per category is printed for the README's Reliability
section. Kill points are seeded events (the k-th file operation, model call or progress record), not times, so a
loaded machine changes nothing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import faults  # noqa: E402

SEED = 21
#: The categories in two campaign processes of about equal length (two cores in CI).
GROUPS = (("interrupts", "models", "messages"), ("files", "atlases", "folders", "disk", "concurrent"))
#: Cases each category must try at least.
MINIMUM = {"files": 250, "models": 15, "atlases": 40, "folders": 15, "interrupts": 80, "disk": 28,
           "concurrent": 12, "messages": 8}


def _campaign(categories: tuple, workdir: Path) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(faults.HERE.parent), str(faults.HERE),
                                                        os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(Path(faults.__file__).resolve()), str(workdir), str(SEED),
                          *categories], capture_output=True, text=True, env=env)
    lines = [json.loads(line[len(faults.MARK):]) for line in run.stdout.splitlines()
             if line.startswith(faults.MARK)]
    if run.returncode != 0:
        raise RuntimeError(f"the campaign {categories} failed: {run.stderr[-3000:]}")
    return lines


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    with ThreadPoolExecutor(len(GROUPS)) as pool:
        parts = list(pool.map(lambda g: _campaign(g, tmp_path_factory.mktemp("faults")), GROUPS))
    lines = [line for part in parts for line in part]
    return {"results": [r for r in lines if "kind" in r], "tallies": {t["tally"]: t for t in lines if "tally" in t}}


@pytest.mark.parametrize("category", faults.CATEGORIES)
def test_every_fault_ends_in_a_clear_error_or_a_correct_result(campaign, category, capsys):
    tally = campaign["tallies"][category]
    with capsys.disabled():
        print(f"\n[faults] {category}: tried {tally['tried']}, clean {tally['clean']}, raw {tally['raw']}, wrong "
              f"{tally['wrong']}, partial {tally['partial']}, killed mid-publish {tally['mid_publish']}, skipped "
              f"{tally['skipped']} ({tally['seconds']} s)")
    results = [r for r in campaign["results"] if r["category"] == category]
    skipped = [r for r in results if r["outcome"] == "skipped"]
    if skipped and not tally["tried"]:
        pytest.skip(skipped[0]["detail"])
    assert tally["tried"] >= MINIMUM[category]
    problems = [f"{r['outcome']}: {r['kind']}: {r['detail']}" for r in results if r["outcome"] not in
                ("clean", "skipped")]
    assert not problems, "\n".join(problems)


def test_the_campaign_tries_what_the_issue_lists(campaign):
    kinds = {r["kind"] for r in campaign["results"]}
    for needed in ("nii.gz: a valid compressed stream", "nii: vox_offset past the end", "dim[3] = 0",
                   "pixdim[1] = 0 (sform 0.9 mm)", "header declares 2000x2400x600 voxels", "nrrd gzip: data cut",
                   "mhd raw: data file missing", "mask: mha compressed"):
        assert any(needed in k for k in kinds), needed
    for needed in ("load_model: dropout,", "load_model: normal, scale 1e-09", "ibix backward --atlas: NaN responses",
                   "block offsets reversed", "negative denominators", "forward, then forward-no-png",
                   "forward over", "backward over", "atlas over", "cohort: kill", "cohort: interrupt",
                   "kill-mid-write", "while forward holds the folder", "a case named cohort.csv",
                   "output folder through a symbolic link loop", "ONNX Runtime imported with too little memory"):
        assert any(needed in k for k in kinds), needed
