"""IBIXLib.controller: the state machine both faces drive (the Slicer widget and the web page), on a real MRML
scene (slicer-core) with real engine processes: the model check in IBIXLib/child.py, runs in the stand-in engine
FAKE_CHILD (exact success, failure, hang, and a run estimated at 23 minutes). No Qt and no trame here: a recording
face and a timer the test fires."""
from __future__ import annotations

import ast
import os
import sys
import time

import numpy as np
import pytest

from conftest_slicer import (MODULE_DIR, FakeTimer, assert_scene_unchanged, case, fake_child,  # noqa: F401
                             import_slicer_core, scene_snapshot, slicer_app)

slicer = import_slicer_core()

from IBIXLib import controller, logic  # noqa: E402


class RecordingFace:
    """A face: counts changes, records errors, warnings and questions; answers questions with ``answer``."""

    def __init__(self):
        self.changes, self.errors, self.warnings, self.questions = 0, [], [], []
        self.answer = None  # None: leave the question open

    def bind(self, c):
        self.c = c
        return dict(changed=self.changed, error=self.errors.append, warning=self.warnings.append, ask=self.ask)

    def changed(self):
        self.changes += 1

    def ask(self, question):
        self.questions.append(question)
        if self.answer is not None:
            self.c.answer(self.answer)


@pytest.fixture
def face():
    return RecordingFace()


def _controller(face, case=None, load=True):
    engine = logic.Logic(python=sys.executable, timerFactory=FakeTimer)
    face.c = None
    c = controller.Controller(engine, FakeTimer(), **face.bind(None))
    face.c = c
    c.setParameters(controller.settings())
    if load:
        c.loadModel(str(case["model"]))
        _drive(c)
        p = c.parameters
        p.inputVolume0, p.inputSegmentation, p.inputSegmentId = case["volume"], case["seg"], case["sid"]
        p.outputSegmentation, p.outputSegmentId = case["seg"], case["sid"]
    return c


def _drive(c, deadline=60.0):
    end = time.perf_counter() + deadline
    while c.job is not None and time.perf_counter() < end:
        c.timer.fire()
        time.sleep(0.01)
    assert c.job is None, "the job did not end"


@pytest.fixture(autouse=True)
def _no_engine_left_behind():
    yield
    for timer in FakeTimer.instances:
        timer.stop()


def test_controller_is_free_of_qt_and_trame():
    for name in ("controller.py", "logic.py"):
        tree = ast.parse((MODULE_DIR / "IBIXLib" / name).read_text())
        modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not modules & {"qt", "ctk", "trame", "trame_slicer", "trame_server"}, (name, modules)


def test_settings_are_one_list_for_both_faces():
    """The web page's settings object and the module's parameter node class come from one declaration."""
    web = controller.settings(blocks=200)
    declared = controller.settingsClass("X", lambda lo, hi: ("range", lo, hi))
    assert set(vars(web)) == set(declared.__annotations__)
    assert web.blocks == 200 and web.forwardJitters == declared.forwardJitters == 8 and web.inputVolume0 is None
    assert declared.__annotations__["forwardJitters"].__metadata__ == (("range", 1, 256),)
    with pytest.raises(AttributeError, match="no IBIX setting"):
        controller.settings(nJitters=3)


def test_what_is_enabled_follows_the_model_the_masks_and_the_job(face, case, fake_child):
    c = _controller(face, load=False)
    assert c.enabled() == {"loadModel": True, "runtime": True, "generateOutput": False, "runForward": False,
                           "runBackward": False, "live": False, "cancel": False, "runCohort": False,
                           "openCohortCase": False, "coarse": False}
    c.loadModel(str(case["model"]))
    assert c.job is not None and c.progress == (0, 0) and not c.enabled()["loadModel"]  # busy indicator
    _drive(c)
    assert c.enabled()["generateOutput"] and not c.enabled()["runForward"]
    assert "T1" in c.cardSummary and c.deviceSummary == "cpu (CPUExecutionProvider)" and c.channels == ["T1"]
    c.parameters.inputVolume0, c.parameters.inputSegmentation = case["volume"], case["seg"]
    c.parameters.coarseToFine = True
    assert c.enabled()["runForward"] and c.enabled()["coarse"] and not c.enabled()["runBackward"]
    fake_child.setenv("IBIX_FAKE", "hang")
    c.parameters.inputSegmentId = case["sid"]
    c.runForward()
    busy = c.enabled()
    assert busy["cancel"] and not (busy["runForward"] or busy["loadModel"] or busy["runCohort"])
    c.cancel()
    assert c.status == "Cancelling..."
    _drive(c)
    assert c.status.startswith("Cancelled") and c.enabled()["runForward"] and face.errors == []


def test_run_reports_estimate_progress_time_left_and_statistics(face, case, fake_child):
    c = _controller(face, case)
    before = face.changes
    fake_child.setenv("IBIX_FAKE", "pause")  # the engine waits after its progress until the test has seen it
    c.runForward()
    statuses = []
    while c.job is not None:
        c.timer.fire()
        statuses.append((c.status, c.progress, c.estimate))
        if c.progress == (2, 3):
            open(os.path.join(c.job.folder, "go-on"), "w").close()
        time.sleep(0.01)
    assert any("/3), about" in s and s.endswith("s left") for s, _p, _e in statuses), statuses
    assert any(p == (2, 3) for _s, p, _e in statuses)
    assert c.estimate == "Predicted: 35 model evaluations, about 2.5 s"  # shown while it ran; nothing asked
    assert face.questions == [] and face.changes > before
    node = c.parameters.resultVolume
    np.testing.assert_allclose(slicer.util.arrayFromVolume(node), case["array"] * case["mask"])
    assert "forward done" in c.status and node.GetName() in c.status
    assert dict(c.statisticsRows())["inside the mask"] == "62.5 %"


def test_a_run_estimated_above_a_minute_is_asked_first(face, case, fake_child):
    """The run is stopped when its estimate arrives (before the mapping's work) and the user is asked; no: the
    scene is unchanged; yes: it runs to the end without a second question."""
    c = _controller(face, case)
    fake_child.setenv("IBIX_FAKE", "slow")
    before = scene_snapshot(case["app"], case["volume"], case["seg"], [case["sid"]])
    c.runBackward()
    _drive(c)
    assert len(face.questions) == 1 and "23000 model evaluations, about 23 min" in face.questions[0]
    assert "to cut it: an NVIDIA GPU; fewer blocks" in face.questions[0]
    assert c.question and c.busy and not c.enabled()["runBackward"]  # waiting for the answer
    c.answer(False)
    assert c.status.startswith("Not run.") and not c.busy and face.errors == []
    assert_scene_unchanged(before, scene_snapshot(case["app"], case["volume"], case["seg"], [case["sid"]]))
    face.answer = True
    c.runBackward()
    _drive(c)  # asked, the yes starts the run again at once, and it runs to its end
    assert len(face.questions) == 2 and "backward done" in c.status, c.status
    assert c.parameters.resultVolume.GetAttribute("IBIX.kind") == "backward"


def test_estimate_only_computes_no_map(face, case, fake_child):
    c = _controller(face, case)
    before = scene_snapshot(case["app"], case["volume"], case["seg"], [case["sid"]])
    c.estimateForward()
    _drive(c)
    assert c.status == c.estimate == "Predicted: 35 model evaluations, about 2.5 s" and face.errors == []
    assert_scene_unchanged(before, scene_snapshot(case["app"], case["volume"], case["seg"], [case["sid"]]))
    fake_child.setenv("IBIX_FAKE", "slow")
    c.estimateBackward()  # only an estimate: nothing to ask
    _drive(c)
    assert face.questions == [] and "about 23 min" in c.status


def test_console_estimates(case, fake_child):
    engine = logic.Logic(python=sys.executable, timerFactory=FakeTimer)
    engine.loadModel(str(case["model"]), installDependencies=False)
    try:
        estimate = engine.estimateForward([case["volume"]], case["seg"], case["sid"], n_jitters=8)
        assert estimate == {"stage": "estimate", "evaluations": 35, "seconds": 2.5, "advice": []}
        fake_child.setenv("IBIX_FAKE", "slow")
        estimate = engine.estimateBackward([case["volume"]], None, case["seg"], case["sid"], n_blocks=265)
        assert estimate["evaluations"] == 23000 and estimate["advice"] == ["an NVIDIA GPU", "fewer blocks"]
    finally:
        engine.stopStandby()


def test_errors_reach_the_face_and_the_status_line(face, case, fake_child):
    c = _controller(face, case)
    empty = case["seg"].GetSegmentation().AddEmptySegment("", "empty")
    c.parameters.inputSegmentId = empty
    c.runForward()
    assert c.job is None and "is empty" in face.errors[-1] and c.statusError
    c.parameters.inputSegmentId = case["sid"]
    fake_child.setenv("IBIX_FAKE", "fail")
    c.runForward()
    _drive(c)
    assert "n_jitters must be at least 1" in face.errors[-1] == c.status
    fake_child.setenv("IBIX_FAKE", "hang")
    c.runForward()
    c.runBackward()  # one job at a time
    assert "in progress" in face.warnings[-1]
    c.cancel()
    _drive(c)


def test_closing_the_scene_cancels_the_run_and_forgets_the_atlas(face, case, fake_child):
    c = _controller(face, case)
    fake_child.setenv("IBIX_FAKE", "hang")
    c.runForward()
    c.atlas = ("key", "path")
    case["app"].scene.Clear(0)
    c.sceneClosing()
    _drive(c)
    assert c.parameters is None and c.atlas is None and not c.live
    assert case["app"].scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0
