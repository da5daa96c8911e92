"""Result folders as one unit (folders.py, session.Outputs): a rerun replaces the earlier run's set, a failed or
interrupted run leaves it untouched, one run at a time holds a folder, what killed runs left is completed or
removed."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import IBIXLogic as ibx
import onnx_models as om
from IBIXLogic import folders, session
from IBIXLogic.cli import main
from onnx_models import KERNEL, folder_problems

SHAPE = (3, 16, 18)


@pytest.fixture
def case(tmp_path, rng):
    model = om.save(om.convolution(KERNEL), tmp_path, "conv", {"spatial_dims": 2, "slice_axis": "axial"})
    geometry = ibx.Geometry((1.0, 2.0, 3.0), (0.9, 1.1, 2.5), np.eye(3), SHAPE)
    volume = ibx.write_volume(tmp_path / "t1.nrrd", rng.normal(50, 10, SHAPE).astype(np.float32), geometry)
    mask = np.zeros(SHAPE, np.uint8)
    mask[1, 6:9, 7:10] = 1
    mask_path = ibx.write_volume(tmp_path / "mask.nrrd", mask, geometry)
    base = ["--model", str(model), "--input", str(volume), "--quiet"]
    return {"tmp": tmp_path, "out": tmp_path / "out", "model": model, "volume": volume, "mask": mask_path,
            "forward": ["forward", *base, "--mask", str(mask_path), "--n-jitters", "1"],
            "backward": ["backward", *base, "--out-mask", str(mask_path), "--n-blocks", "6", "--n-jitters", "1"],
            "predict": ["predict", *base], "atlas": ["atlas", *base, "--n-blocks", "6", "--n-jitters", "1"]}


def run(case, command, *extra, out=None):
    return main(case[command] + ["--output", str(out or case["out"]), *extra])


def listing(folder: Path) -> dict:
    """Every entry of a folder (hidden ones too) with a digest of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(Path(folder).iterdir())}


def summary_names(folder: Path) -> list:
    return sorted(Path(p).name for p in json.loads((folder / "summary.json").read_text())["files"])


def dead_pid() -> int:
    pid = 4_000_000
    while folders.process_alive(pid):
        pid += 1
    return pid


@pytest.mark.parametrize("first, second, expected", [
    (("forward",), ("forward", "--no-png"), ["forward_normalized.nrrd", "forward_signed.nrrd", "summary.json"]),
    (("forward",), ("backward",), ["backward.nrrd", "backward.png", "backward_blocks.nrrd", "summary.json"]),
    (("backward", "--no-png"), ("predict", "--format", "nifti"), ["output.nii.gz", "summary.json"]),
    (("atlas",), ("forward", "--no-png"), ["forward_normalized.nrrd", "forward_signed.nrrd", "summary.json"]),
])
def test_a_rerun_replaces_the_earlier_runs_files(case, first, second, expected):
    """A rerun with --no-png used to leave the earlier forward.png beside the new maps: the folder now holds
    exactly the new run's files, which its summary lists."""
    assert run(case, *first) == 0
    assert run(case, *second) == 0
    assert sorted(p.name for p in case["out"].iterdir()) == expected == summary_names(case["out"])
    assert folder_problems(case["out"], rerun=True) == []


def test_files_of_others_in_the_folder_are_left_alone(case):
    case["out"].mkdir()
    (case["out"] / "notes.txt").write_text("mine")
    assert run(case, "forward") == 0 and run(case, "predict") == 0
    assert (case["out"] / "notes.txt").read_text() == "mine"
    assert "notes.txt" not in summary_names(case["out"])


@pytest.mark.parametrize("failure", [ibx.InputError("the figure failed"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_run_leaves_the_earlier_set_untouched(case, monkeypatch, failure, capsys):
    """The maps are written (staged) before the figure fails: the folder still holds the earlier run, whole."""
    assert run(case, "backward") == 0
    before = listing(case["out"])

    def fail(*args, **kwargs):
        raise failure
    monkeypatch.setattr(session, "forward_png", fail)
    assert run(case, "forward") == (2 if isinstance(failure, ibx.IBIXError) else 130)
    assert listing(case["out"]) == before  # no staging folder, no lock, no new map beside the old summary
    if isinstance(failure, KeyboardInterrupt):
        assert "interrupted; the output folder holds the previous results" in capsys.readouterr().err


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_first(case, capsys):
    """Another process holds the folder: the run is refused (exit 2) naming it; once that process is gone (killed,
    its lock file left behind), the next run takes the lock over."""
    case["out"].mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from IBIXLogic import folders; "
                               f"lock = folders.FolderLock({str(case['out'])!r}, 'forward'); lock.acquire(); "
                               "print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run(case, "forward") == 2
        message = capsys.readouterr().err
        assert f"another IBIX run is writing into this folder (ibix forward, process {holder.pid}" in message
        assert list(case["out"].iterdir()) == [case["out"] / ".ibix.lock"]
    finally:
        holder.kill()
        holder.wait()
    assert (case["out"] / ".ibix.lock").exists()  # a killed holder leaves its file behind
    assert main([a for a in case["forward"] if a != "--quiet"] + ["--output", str(case["out"])]) == 0  # the note
    assert f"took over the lock of process {holder.pid}, which is gone" in capsys.readouterr().err
    assert folder_problems(case["out"], rerun=True) == []


def test_the_same_process_cannot_take_a_folder_twice(case):
    with session.Outputs(case["out"], "nrrd", [], "forward") as outputs:
        outputs.check()
        with pytest.raises(ibx.InputError, match=f"process {os.getpid()}"):
            session.Outputs(case["out"], "nrrd", [], "backward").check()
    assert list(case["out"].iterdir()) == []  # lock and staging folder gone


def test_publishing_killed_at_any_step_is_completed_by_the_next_run(case, monkeypatch):
    """The new run's staged files are complete once its summary is staged; a kill between any two steps of
    publishing leaves a folder that the next run (folders.recover) turns into exactly the new run's set."""
    assert run(case, "forward") == 0
    assert run(case, "backward", out=case["tmp"] / "new") == 0
    steps = len(summary_names(case["tmp"] / "new")) + 5  # removals, moves and the summary
    for kill_at in range(steps):
        folder = case["tmp"] / f"killed{kill_at}"
        assert run(case, "forward", out=folder) == 0
        staging = folder / f".ibix-run-{dead_pid()}-0123abcd.partial"
        staging.mkdir()
        for name in summary_names(case["tmp"] / "new"):
            (staging / name).write_bytes((case["tmp"] / "new" / name).read_bytes())
        calls = []

        def replace_or_die(source, target, real=os.replace):
            calls.append(target)
            if len(calls) > kill_at:
                raise SystemExit("killed")
            real(source, target)
        monkeypatch.setattr(folders.os, "replace", replace_or_die)
        try:
            folders.publish(folder, staging)
        except SystemExit:
            pass
        monkeypatch.undo()
        notes = folders.recover(folder)
        assert sorted(p.name for p in folder.iterdir()) == summary_names(case["tmp"] / "new"), kill_at
        assert folder_problems(folder, rerun=True) == []
        assert not notes or "completed the publishing" in notes[0]


def test_what_dead_runs_left_is_removed_and_what_live_ones_write_is_kept(case):
    case["out"].mkdir()
    dead, alive = dead_pid(), os.getppid()
    left = [f".forward_signed.{dead}-0123abcd.partial.nrrd", f".ibix-run-{dead}-0123abcd.partial",
            ".summary.json.partial", ".case1.partial-0123abcd", ".forward_normalized_preview.nrrd"]
    for name in left:
        (case["out"] / name).mkdir() if "ibix-run" in name or "case1" in name else (case["out"] / name).write_text("x")
    kept = f".output.{alive}-89abcdef.partial.nrrd"  # another live process writing here through the Python API
    (case["out"] / kept).write_text("x")
    assert run(case, "predict") == 0
    assert sorted(p.name for p in case["out"].iterdir()) == sorted([kept, "output.nrrd", "summary.json"])


def test_an_input_that_is_a_file_of_the_earlier_run_is_refused(case, capsys):
    assert run(case, "atlas") == 0
    atlas = case["out"] / "atlas.npz"
    code = main(case["backward"] + ["--atlas", str(atlas), "--output", str(case["out"])])
    assert code == 2
    assert f"{atlas}: an input of this run is a file of the earlier run" in capsys.readouterr().err
    assert atlas.is_file() and folder_problems(case["out"], rerun=True) == []


def test_an_output_folder_through_a_link_loop_is_a_clear_error(case, capsys):
    loop = case["tmp"] / "loop"
    loop.symlink_to(loop)
    assert run(case, "predict", out=loop / "sub") == 2
    assert "loop" in capsys.readouterr().err.splitlines()[-1]


def test_process_alive():
    assert folders.process_alive(os.getpid()) and folders.process_alive(os.getppid())
    assert not folders.process_alive(dead_pid()) and not folders.process_alive(0)


def test_an_interrupt_while_publishing_comes_after_it(case):
    """Ctrl-C reaches a process with several threads (ONNX Runtime's): publishing finishes first, then the
    interrupt is raised."""
    import signal
    import threading

    steps = []
    with pytest.raises(KeyboardInterrupt):
        with folders.signals_deferred():
            sender = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT))
            sender.start()
            sender.join()
            steps.append("published")
    assert steps == ["published"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
