"""IBIXLib.jobs: the engine runs in a real child process, on a real MRML scene (slicer-core).

The protocol cases (success, failure, crash, hang + cancel, scene closed) use a small stand-in child that speaks
the JSON-lines protocol of ``ibix ... --progress-format jsonl`` with a known result, so that each case is exact
and fast; the runs through the real ``ibix`` command line are in the second half.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest_slicer import (assert_scene_unchanged, conv_model, fake_child, import_slicer_core,  # noqa: F401
                             scene_snapshot, slicer_app)

slicer = import_slicer_core()

import IBIXLogic as ibx  # noqa: E402
from IBIXLib import jobs, scene  # noqa: E402

SHAPE = (4, 18, 14)
MATRIX = np.array([[0.0, -0.9, 0.0, 10.0], [1.1, 0.0, 0.0, -5.0], [0.0, 0.0, 2.5, 3.0], [0.0, 0.0, 0.0, 1.0]])

@pytest.fixture
def case(slicer_app, tmp_path):
    array = np.random.default_rng(3).uniform(1, 2, SHAPE).astype(np.float32)
    volume = slicer.util.addVolumeFromArray(array, MATRIX, name="T1")
    segmentation = slicer_app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "masks")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    mask = np.zeros(SHAPE, np.uint8)
    mask[2, 6:10, 4:8] = 1
    seg_id = segmentation.GetSegmentation().AddEmptySegment("", "region")
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, seg_id, volume)
    return dict(app=slicer_app, array=array, volume=volume, segmentation=segmentation, seg_id=seg_id,
                mask=mask.astype(bool), tmp=tmp_path)


def _snapshot(case):
    return scene_snapshot(case["app"], case["volume"], case["segmentation"], [case["seg_id"]])


def _request(case, kind="forward", **params):
    return scene.prepare_request(kind, ["T1"], [case["volume"]], case["segmentation"], case["seg_id"], **params)


def _run_and_time(run, tick=0.01, deadline=120.0):
    """Start and poll a run as the module's timer does, on a main-thread loop that ticks every ``tick`` s.

    Returns (longest main-thread step in CPU seconds of this thread, longest wall gap between two ticks). The CPU
    time is what the runner itself costs the main thread; the wall gap also counts other processes on a shared
    machine, so it is reported, not asserted. (No step may wait: poll() only takes what the reader thread queued.)
    """
    steps, gaps = [], []

    def timed(call):
        t0 = time.thread_time()
        call()
        steps.append(time.thread_time() - t0)

    timed(run.start)
    last, end = time.perf_counter(), time.perf_counter() + deadline
    while not run.done and time.perf_counter() < end:
        time.sleep(tick)
        timed(run.poll)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    assert run.done, "the run did not end"
    return max(steps), max(gaps)


def _folders(tmp):
    return sorted(p for p in os.listdir(tmp) if p.startswith("IBIX-"))


@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    """Job folders go to a folder of the test, so that leftovers can be counted."""
    root = tmp_path / "jobs"
    root.mkdir()
    monkeypatch.setattr(jobs.tempfile, "tempdir", str(root))
    return root


# ------------------------------------------------------------------------------------------------------------------
# The protocol with a stand-in child
# ------------------------------------------------------------------------------------------------------------------

def test_success_adds_the_result_node_with_geometry_progress_and_no_leftovers(case, fake_child, temp_root):
    progress, ended = [], []
    run = jobs.Run(_request(case), "model.onnx", device="cpu", on_progress=lambda *p: progress.append(p),
                   on_done=ended.append)
    longest_step, longest_gap = _run_and_time(run)
    assert run.state == jobs.FINISHED, run.error
    assert ended == [run]
    assert progress and progress[-1] == (2, 3, "forward")
    node = run.node
    np.testing.assert_allclose(slicer.util.arrayFromVolume(node), case["array"] * case["mask"])
    assert scene.geometry_from_volume_node(node).matches(scene.geometry_from_volume_node(case["volume"]))
    assert node.GetAttribute("IBIX.evaluations") == "7"
    assert node.GetAttribute("IBIX.provider") == "CPUExecutionProvider"
    assert "7 evaluations" in run.status and "CPUExecutionProvider" in run.status
    assert _folders(temp_root) == []  # the temporary folder is removed
    assert "a human message on stderr" in run.process.tail
    # Main thread: every step (writing inputs, each poll, loading the result) is short; never blocked > 0.2 s.
    assert longest_step < 0.2, (longest_step, longest_gap)


def test_signed_forward_and_output_read_their_own_files(case, fake_child):
    run = jobs.Run(_request(case, display="signed"), "model.onnx")
    jobs.wait(run.start())
    assert run.state == jobs.FINISHED, run.error
    np.testing.assert_allclose(slicer.util.arrayFromVolume(run.node), -case["array"] * case["mask"])
    assert run.node.GetAttribute("IBIX.display") == "signed"
    output = jobs.Run(scene.prepare_request("output", ["T1"], [case["volume"]]), "model.onnx")
    jobs.wait(output.start())
    np.testing.assert_allclose(slicer.util.arrayFromVolume(output.node), case["array"])
    assert output.node.GetName() == "output generated from T1"


@pytest.mark.parametrize("mode, state, message", [
    ("fail", jobs.FAILED, "n_jitters must be at least 1"),
    ("crash", jobs.CRASHED, "stopped unexpectedly"),
])
def test_failure_and_crash_become_messages_and_leave_the_scene_unchanged(case, fake_child, temp_root, mode, state,
                                                                         message):
    fake_child.setenv("IBIX_FAKE", mode)
    before = _snapshot(case)
    run = jobs.Run(_request(case), "model.onnx")
    jobs.wait(run.start())
    assert run.state == state and message in run.error
    if mode == "crash":
        assert "CUDA failure 700" in run.error  # the child's last words are shown
        assert run.process.returncode != 0
    assert run.node is None
    assert_scene_unchanged(before, _snapshot(case))
    assert _folders(temp_root) == []


def test_cancel_ends_the_child_and_leaves_the_scene_unchanged(case, fake_child, temp_root):
    fake_child.setenv("IBIX_FAKE", "hang")
    before = _snapshot(case)
    run = jobs.Run(_request(case), "model.onnx").start()
    hanging = os.path.join(run.folder, "hanging")
    while not os.path.exists(hanging):  # the child is in its (endless) computation
        run.poll()
        time.sleep(0.01)
    polls = 0
    run.cancel()
    while not run.done:
        run.poll()
        polls += 1
        time.sleep(0.01)
    assert run.state == jobs.CANCELLED and "not changed" in run.error
    assert run.process._proc.poll() is not None  # the child is gone
    assert_scene_unchanged(before, _snapshot(case))
    assert _folders(temp_root) == []


def test_closing_the_scene_during_a_run_cancels_it(case, fake_child, temp_root):
    """Issue 11 (5): closing the scene at any moment is safe; nothing is added to the new scene."""
    fake_child.setenv("IBIX_FAKE", "hang")
    run = jobs.Run(_request(case), "model.onnx").start()
    case["app"].scene.Clear(0)
    jobs.wait(run)
    assert run.state == jobs.CANCELLED and "scene was closed" in run.error
    assert case["app"].scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0
    assert _folders(temp_root) == []


def test_closing_the_scene_while_the_result_loads_adds_nothing(case, fake_child, monkeypatch):
    run = jobs.Run(_request(case), "model.onnx").start()
    monkeypatch.setattr(jobs, "SPLIT_AFTER", 0.0)  # as with a slow read: the node at the next poll
    while run._result is None:  # the child finished and its result was read; not yet in the scene
        run.poll()
        time.sleep(0.01)
    case["app"].scene.Clear(0)
    run.poll()
    assert run.state == jobs.CANCELLED and "scene was closed" in run.error
    assert case["app"].scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0


def test_unknown_parameter_is_refused_before_anything_starts(case, fake_child, temp_root):
    with pytest.raises(ibx.InputError, match="unknown parameter 'n_blocks' for a forward run"):
        jobs.Run(_request(case, n_blocks=3), "model.onnx").start()
    assert _folders(temp_root) == []


def test_command_line_of_each_kind(case):
    request = _request(case, "backward", n_blocks=30, n_jitters=2, blocks="grid", progressive=True,
                       coarse_blocks=[10, 20], max_jitter=None)
    args = jobs.command_arguments(request, "m.onnx", "/tmp/f", ["/tmp/f/input0.nrrd"], "/tmp/f/mask.nrrd", "cuda")
    assert args[:2] == ["backward", "--model"] and "--progress-format" in args and "jsonl" in args
    for option in (["--out-mask", "/tmp/f/mask.nrrd"], ["--n-blocks", "30"], ["--blocks", "grid"],
                   ["--coarse-blocks", "10", "20"], ["--device", "cuda"], ["--progressive"]):
        text = " ".join(args)
        assert " ".join(option) in text, option
    assert "--max-jitter" not in args


# ------------------------------------------------------------------------------------------------------------------
# A standby engine process: several jobs, one after the other
# ------------------------------------------------------------------------------------------------------------------

def _until(condition, run, deadline=60.0):
    """Poll ``run`` until ``condition()`` holds (a deadline on a shared machine, not a speed check)."""
    end = time.perf_counter() + deadline
    while not condition() and time.perf_counter() < end:
        run.poll()
        time.sleep(0.01)
    assert condition(), run.error


def test_a_standby_runs_jobs_one_after_the_other_each_with_its_own_folder_and_records(case, fake_child, temp_root):
    standby = jobs.Standby("cpu", python=sys.executable)
    try:
        pid = standby.process._proc.pid
        fake_child.setenv("IBIX_FAKE", "preview")  # the first job waits after its preview until told to go on
        first = jobs.Run(_request(case, progressive=True), "model.onnx", "cpu", python=sys.executable)
        first.start(standby)
        assert first.standby is standby and first.folder != standby.folder
        _until(lambda: first.preview.node is not None, first)
        assert standby.busy and standby.take() is None  # one job at a time
        beside = jobs.Run(_request(case), "model.onnx", "cpu", python=sys.executable).start(standby)
        assert beside.standby is None and beside.process._proc.pid != pid  # a busy standby is never handed a second
        open(os.path.join(first.folder, "go-on"), "w").close()
        for run in (first, beside):
            assert jobs.wait(run) == jobs.FINISHED, run.error
        np.testing.assert_allclose(slicer.util.arrayFromVolume(first.node), case["array"] * case["mask"])
        assert not os.path.exists(first.folder) and standby.take() is standby and not standby.busy
        fake_child.setenv("IBIX_FAKE", "fail")
        failed = jobs.Run(_request(case), "model.onnx", "cpu", python=sys.executable).start(standby)
        assert jobs.wait(failed) == jobs.FAILED and failed.error == "n_jitters must be at least 1"
        fake_child.setenv("IBIX_FAKE", "ok")
        signed = jobs.Run(_request(case, display="signed"), "model.onnx", "cpu", python=sys.executable)
        assert jobs.wait(signed.start(standby)) == jobs.FINISHED, signed.error
        np.testing.assert_allclose(slicer.util.arrayFromVolume(signed.node), -case["array"] * case["mask"])
        # each job's records and output are its own: the failure stayed with its run
        assert failed.process.record["stage"] == "failed" and signed.process.record["stage"] == "finished"
        assert signed.process.tail.count("a human message on stderr") == 1
        assert all(os.path.dirname(os.path.dirname(path)) == signed.folder
                   for path in signed.process.record["files"].values())
        assert standby.process._proc.pid == pid and standby.process._proc.poll() is None and standby.jobs == 3
        assert _folders(temp_root) == [os.path.basename(standby.folder)]  # every job folder is removed
        other = jobs.Standby("auto", python=sys.executable)
        elsewhere = jobs.Run(_request(case), "model.onnx", "cpu", python=sys.executable).start(other)
        assert elsewhere.standby is None and other.stopped and other.take() is None  # another device: a new process
        assert jobs.wait(elsewhere) == jobs.FINISHED, elsewhere.error
    finally:
        standby.stop()
    jobs.wait(standby.process)
    assert standby.process.state == jobs.CANCELLED and _folders(temp_root) == []


@pytest.mark.parametrize("end", ["cancel", "crash", "scene closed"])
def test_a_standby_job_that_is_cancelled_or_crashes_ends_its_process(case, fake_child, temp_root, end):
    fake_child.setenv("IBIX_FAKE", "crash" if end == "crash" else "hang")
    before = _snapshot(case)
    standby = jobs.Standby("cpu", python=sys.executable)
    run = jobs.Run(_request(case), "model.onnx", "cpu", python=sys.executable).start(standby)
    if end != "crash":
        _until(lambda: os.path.exists(os.path.join(run.folder, "hanging")), run)
    if end == "cancel":
        run.cancel()
    elif end == "scene closed":
        case["app"].scene.Clear(0)
    jobs.wait(run)
    expected = {"cancel": (jobs.CANCELLED, "not changed"), "crash": (jobs.CRASHED, "CUDA failure 700"),
                "scene closed": (jobs.CANCELLED, "scene was closed")}[end]
    assert (run.state, expected[1] in run.error) == (expected[0], True), run.error
    assert standby.process._proc.poll() is not None and standby.take() is None  # a new standby takes its place
    assert _folders(temp_root) == []
    if end != "scene closed":
        assert_scene_unchanged(before, _snapshot(case))


def test_the_logic_keeps_its_engine_process_for_the_next_runs_and_replaces_one_that_ended(case, fake_child):
    from conftest_slicer import FakeTimer
    from IBIXLib import logic

    engine = logic.Logic(python=sys.executable, timerFactory=FakeTimer)
    engine.loadModel(str(conv_model(case["tmp"])), installDependencies=False)
    try:
        standby = engine._standby
        runs = [engine.runForward([case["volume"]], case["segmentation"], case["seg_id"]) for _ in range(2)]
        assert all(node is not None for node in runs) and engine._standby is standby and standby.jobs == 2
        fake_child.setenv("IBIX_FAKE", "hang")
        run = engine.startForward([case["volume"]], case["segmentation"], case["seg_id"], poll=False)
        assert run.standby is standby and engine._standby is None
        run.cancel()
        jobs.wait(run)
        assert engine._standby is None and standby.process._proc.poll() is not None
        engine._prestartTimer.fire()  # a new engine process once the run's end is drawn
        assert engine._standby is not None and engine._standby is not standby
    finally:
        engine.stopStandby()


def test_a_standby_waits_for_its_next_job_until_its_idle_limit(tmp_path, monkeypatch):
    from IBIXLib import child

    path = tmp_path / "job.json"
    monkeypatch.setattr(child, "IDLE_LIMIT", 0.05)
    assert child.next_job(str(path)) is None
    path.write_text('{"job": 3, "arguments": ["forward", "--n-jitters", 2]}')
    assert child.next_job(str(path)) == (3, ["forward", "--n-jitters", "2"]) and not path.exists()


# ------------------------------------------------------------------------------------------------------------------
# The real child: child.py's cancel watchdog behind a launcher process, and the model probe
# ------------------------------------------------------------------------------------------------------------------

def _via_launcher(args, environment):
    """Like PythonSlicer on Linux: a launcher process that starts the real Python as its own child."""
    code = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
    return jobs.subprocess_launcher([sys.executable, "-c", code, *args], environment)


def test_cancel_reaches_the_real_python_behind_a_launcher(tmp_path):
    folder = tmp_path / "job"
    folder.mkdir()
    marker = tmp_path / "pid"
    # child.py with a command that never ends: the watchdog must end it when the cancel file appears
    script = tmp_path / "endless.py"
    script.write_text(f"import os, time\nopen({str(marker)!r} + '.partial', 'w').write(str(os.getpid()))\n"
                      f"os.replace({str(marker)!r} + '.partial', {str(marker)!r})\ntime.sleep(600)\n")
    args = [sys.executable, "-c",
            "import runpy, sys; sys.path.insert(0, sys.argv[1]); import child; child.watch(sys.argv[2]); "
            "runpy.run_path(sys.argv[3], run_name='__main__')",
            os.path.dirname(jobs.CHILD_SCRIPT), str(folder), str(script)]
    process = jobs.Process(args, str(folder), launcher=_via_launcher)
    while not marker.exists():
        time.sleep(0.01)
    pid = int(marker.read_text())
    process.cancel()
    jobs.wait(process)
    assert process.state == jobs.CANCELLED
    deadline = time.perf_counter() + 30  # generous: a deadline on a shared machine, not a speed check
    while _alive(pid) and time.perf_counter() < deadline:  # the real Python ends on its own (watchdog)
        time.sleep(0.01)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    if sys.platform == "win32":
        out = subprocess.run(["tasklist", "/FI", f"PID eq {pid}"], capture_output=True, text=True).stdout
        return str(pid) in out
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as ended
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


def _slicer_pipe(args, environment):
    """A child's pipe exactly as Slicer's launchConsoleProcess opens it: text, strict decoding (UTF-8 here)."""
    return subprocess.Popen(list(args), env={**os.environ, **environment}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, encoding="utf-8")


def test_an_undecodable_byte_costs_one_character_not_the_run(tmp_path):
    """A child that prints a byte that is not UTF-8, then more than a pipe holds, then its finished record: the
    run finishes (the reader neither stops, which would leave the child blocked on a full pipe, nor loses the
    record); the odd line keeps a replacement character."""
    code = ("import json, sys; out = sys.stdout.buffer; out.write(b'caf\\xe9 au lait\\n'); "
            "out.write((b'x' * 99 + b'\\n') * 2000 + b'caf\\xe9 noir\\n'); "
            "out.write(json.dumps({'stage': 'finished', 'files': {}}).encode() + b'\\n')")
    process = jobs.Process([sys.executable, "-c", code], str(tmp_path), launcher=_slicer_pipe)
    deadline = time.perf_counter() + 60  # generous: a deadline on a shared machine, not a speed check
    while not process.done and time.perf_counter() < deadline:
        process.poll()
        time.sleep(0.01)
    if not process.done:
        process.cancel()
    assert process.state == jobs.FINISHED, (process.state, process.tail[-3:])
    assert process.record == {"stage": "finished", "files": {}} and process.returncode == 0
    assert process.tail[-1] == "caf\ufffd noir" and process.tail[-2] == "x" * 99


def test_a_standby_engine_process_ends_when_slicer_does(tmp_path):
    """3D Slicer (here a Python process holding a Standby behind a PythonSlicer-like launcher) is killed: the
    standby's real Python ends within seconds, not after its 15 idle minutes, although its own parent (the
    launcher) lives on until then."""
    psutil = pytest.importorskip("psutil")
    code = textwrap.dedent(f"""
        import subprocess, sys, time
        sys.path[:0] = [{os.path.dirname(os.path.dirname(jobs.CHILD_SCRIPT))!r}, {jobs.engine_path()!r}]
        from IBIXLib import jobs
        LAUNCH = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
        launcher = lambda args, env: jobs.subprocess_launcher([sys.executable, "-c", LAUNCH, *args], env)
        standby = jobs.Standby("cpu", launcher, sys.executable)
        print(standby.process._proc.pid, flush=True)
        time.sleep(600)
    """)
    slicer_process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pids = []
    try:
        launcher = psutil.Process(int(slicer_process.stdout.readline()))
        deadline = time.perf_counter() + 60
        while not launcher.children() and time.perf_counter() < deadline:  # the real Python behind it
            time.sleep(0.05)
        pids = [launcher.pid] + [p.pid for p in launcher.children(recursive=True)]
        assert len(pids) == 2, pids
        slicer_process.kill()
        slicer_process.wait()
        deadline = time.perf_counter() + 60  # generous: a deadline on a shared machine, not a speed check
        while any(_alive(pid) for pid in pids) and time.perf_counter() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in pids), [pid for pid in pids if _alive(pid)]
    finally:
        slicer_process.kill()
        slicer_process.wait()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, 9)


def test_model_probe_reports_card_device_and_provider(tmp_path):
    pytest.importorskip("onnxruntime")
    probe = jobs.probe_model(str(conv_model(tmp_path)), "cpu", python=sys.executable)
    jobs.wait(probe)
    assert probe.state == jobs.FINISHED, probe.error
    assert probe.info["channels"] == ["T1"] and probe.info["device"] == "cpu"
    assert probe.info["provider"] == "CPUExecutionProvider"
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    probe = jobs.probe_model(str(bad), "cpu", python=sys.executable)
    jobs.wait(probe)
    assert probe.state == jobs.FAILED and "bad.onnx" in probe.error
    with pytest.raises(ibx.InputError, match="model file not found"):
        jobs.probe_model(str(tmp_path / "missing.onnx"))


def test_a_child_reaped_after_its_output_closed_is_still_seen_to_end(case, fake_child):
    """The output can close a moment before the process is reaped: later polls must still see the end."""
    class LateReap:
        def __init__(self, proc):
            self.proc, self.stdout, self.calls = proc, proc.stdout, 0

        def poll(self):
            self.calls += 1
            return None if self.calls <= 3 else self.proc.wait()

        def kill(self):
            self.proc.kill()

    run = jobs.Run(_request(case), "model.onnx",
                   launcher=lambda args, env: LateReap(jobs.subprocess_launcher(args, env))).start()
    jobs.wait(run)
    assert run.state == jobs.FINISHED, run.error


def test_polling_never_waits_for_the_child():
    """poll(), start(), cancel() and a standby's take() and serve() call nothing that waits (wait, join,
    communicate, sleep)."""
    import ast
    import inspect

    main_thread = {"poll", "start", "cancel", "take", "serve", "_take", "_final_state", "_read", "_add", "_end"}
    for cls in (jobs.Process, jobs.StandbyJob, jobs.Standby, jobs.Run, jobs.Probe):
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        for function in ast.walk(tree):
            if not (isinstance(function, ast.FunctionDef) and function.name in main_thread):
                continue
            if cls is jobs.Process and function.name == "_read":
                continue  # the reader thread's loop, not the main thread
            for node in ast.walk(function):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and not isinstance(node.func.value, ast.Constant)
                        and ast.unparse(node.func.value) != "os.path"):
                    assert node.func.attr not in ("wait", "join", "communicate", "sleep", "readline"), \
                        (cls.__name__, function.name, ast.unparse(node))


@pytest.mark.parametrize("mode", ["preview", "hang"])
def test_progressive_preview_is_shown_then_replaced_or_removed(case, fake_child, mode):
    """A progressive run shows the engine's preview map while it runs; the final map replaces it, and a cancel
    leaves no trace of it (nodes and slice views as before)."""
    fake_child.setenv("IBIX_FAKE", mode)
    before = _snapshot(case)
    composite = case["app"].slice_logic.GetSliceCompositeNode()
    views = (composite.GetBackgroundVolumeID(), composite.GetForegroundVolumeID())
    run = jobs.Run(_request(case, progressive=True), "model.onnx").start()
    deadline = time.perf_counter() + 60
    while run.preview.node is None and not run.done and time.perf_counter() < deadline:
        run.poll()
        time.sleep(0.01)
    assert run.preview.node is not None, run.error
    preview = run.preview.node
    assert preview.GetName() == "T1 forward map (region) (preview)"
    np.testing.assert_allclose(slicer.util.arrayFromVolume(preview), 0.5)
    assert composite.GetForegroundVolumeID() == preview.GetID()
    if mode == "hang":
        run.cancel()
        jobs.wait(run)
        assert run.state == jobs.CANCELLED
        assert_scene_unchanged(before, _snapshot(case))
        assert (composite.GetBackgroundVolumeID(), composite.GetForegroundVolumeID()) == views
        return
    open(os.path.join(run.folder, "go-on"), "w").close()
    jobs.wait(run)
    assert run.state == jobs.FINISHED, run.error
    assert composite.GetForegroundVolumeID() == run.node.GetID()
    volumes = [case["app"].scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode").GetName()
               for i in range(case["app"].scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
    assert volumes == ["T1", "T1 forward map (region)"]


def test_cohort_run_reports_a_bad_manifest_and_cancels(tmp_path):
    """A refused manifest becomes the engine's message; Cancel ends a cohort at once; the job folder goes."""
    from pathlib import Path

    model = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "t1_to_t2_cae.onnx"
    bad = tmp_path / "bad.csv"
    bad.write_text("case,input,mask,speed\na,x.nrrd,m.nrrd,1\n")
    with pytest.raises(ibx.InputError, match="unknown mapping"):
        jobs.CohortRun(str(bad), str(model), str(tmp_path / "out"), mapping="sideways")
    run = jobs.CohortRun(str(bad), str(model), str(tmp_path / "out"), python=sys.executable,
                         launcher=jobs.subprocess_launcher).start()
    assert jobs.wait(run) == jobs.FAILED and "unknown column(s) ['speed']" in run.error
    assert not os.path.exists(run.folder)
    good = tmp_path / "good.csv"
    good.write_text("case,input,mask\na,x.nrrd,m.nrrd\n")
    ended = []
    run = jobs.CohortRun(str(good), str(model), str(tmp_path / "out"), python=sys.executable,
                         launcher=jobs.subprocess_launcher, on_done=ended.append).start()
    run.cancel()
    assert jobs.wait(run) == jobs.CANCELLED and ended == [run] and "cancelled" in run.error
    assert not os.path.exists(run.folder)


# ------------------------------------------------------------------------------------------------------------------
# The estimate through the real engine
# ------------------------------------------------------------------------------------------------------------------

def test_a_run_brings_its_estimate_and_an_estimate_alone_changes_nothing(case, temp_root):
    model = conv_model(case["tmp"])
    run = jobs.Run(_request(case, n_jitters=2), str(model), "cpu", python=sys.executable)
    assert run.estimate is None
    jobs.wait(run.start())
    assert run.state == jobs.FINISHED, run.error
    assert run.estimate["stage"] == "estimate" and run.estimate["evaluations"] == run.summary["forward"]["evaluations"]
    before = _snapshot(case)
    nodes = case["app"].scene.GetNumberOfNodes()
    alone = jobs.Run(_request(case, "backward", n_blocks=12, n_jitters=2), str(model), "cpu", python=sys.executable,
                     estimate_only=True)
    assert "--estimate" not in jobs.command_arguments(alone.request, "m", "f", ["i"], "m", "cpu")
    jobs.wait(alone.start())
    assert alone.state == jobs.FINISHED, alone.error
    assert alone.node is None and alone.summary is None and alone.estimate["evaluations"] > 0
    assert alone.status.startswith("backward estimate: ") and alone.status.endswith(" on cpu")
    assert case["app"].scene.GetNumberOfNodes() == nodes
    assert_scene_unchanged(before, _snapshot(case))
    assert _folders(temp_root) == []
    with pytest.raises(ibx.InputError, match="forward, backward and atlas runs"):
        jobs.Run(scene.prepare_request("output", ["T1"], [case["volume"]]), str(model), estimate_only=True)
