"""IBIX.py's own code: the widget's state machine and the console API, on a real MRML scene (slicer-core), with
light stand-ins for the Qt widgets and timer. Slicer's parameterNodeWrapper is used where slicer-core provides it
(it does not today; a stand-in then keeps the fields and sends ModifiedEvent as the wrapper does).

Engine processes are real: the model check runs IBIXLib/child.py; runs use the stand-in engine FAKE_CHILD (exact
success, failure, crash, hang) so that each state is reached for sure.
"""
from __future__ import annotations

import ast
import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from conftest_slicer import (MODULE_DIR, FakeTimer, assert_scene_unchanged, case,  # noqa: F401
                             fake_child, import_slicer_core, scene_snapshot, slicer_app)

slicer = import_slicer_core()

import IBIXLogic as ibx  # noqa: E402
from IBIXLib import controller, jobs  # noqa: E402

MODULE = MODULE_DIR / "IBIX.py"


# ------------------------------------------------------------------------------------------------------------------
# Stand-ins for Qt and the Slicer application pieces slicer-core has not
# ------------------------------------------------------------------------------------------------------------------

class FakeWidget:
    """Any Qt widget: properties as attributes, signals recorded by connect() and sent by emit()."""

    def __init__(self, name):
        self.name, self.enabled, self.visible, self.text, self.toolTip = name, True, True, "", ""
        self.currentPath, self.currentText, self.currentIndex, self.style = "", "", 0, ""
        self.maximum, self.value = 1, 0
        self._node, self._segment, self.slots = None, "", {}

    def connect(self, signal, slot):
        self.slots.setdefault(signal, []).append(slot)

    def emit(self, signal, *args):
        """Call the slots as PythonQt does: with as many of the signal's arguments as each slot takes."""
        import inspect

        for slot in self.slots.get(signal, []):
            parameters = inspect.signature(slot).parameters.values()
            if any(p.kind == p.VAR_POSITIONAL for p in parameters):
                slot(*args)
            else:
                slot(*args[:len(parameters)])

    def blockSignals(self, blocked):
        return False

    def setMaximum(self, value):
        self.maximum = value

    def setValue(self, value):
        self.value = value

    def setStyleSheet(self, style):
        self.style = style

    def setCurrentNode(self, node):
        self._node = node

    def currentNode(self):
        return self._node

    def clear(self):
        self.items = []

    def addItem(self, text):
        self.items = getattr(self, "items", []) + [text]

    def setCurrentSegmentID(self, segment):
        self._segment = segment

    def currentSegmentID(self):
        return self._segment


class FakeUI:
    """``slicer.util.childWidgetVariables`` of IBIX.ui: one FakeWidget per name asked for."""

    def __getattr__(self, name):
        widget = FakeWidget(name)
        setattr(self, name, widget)
        return widget


def standin_parameter_node_wrapper(cls):
    """Fields with their defaults; setting one sends ModifiedEvent to observers (as the wrapper's node does)."""
    import vtk

    fields = list(cls.__annotations__)

    class Wrapped:
        def __init__(self, node=None):
            object.__setattr__(self, "_observers", {})
            for name in fields:
                object.__setattr__(self, name, getattr(cls, name, None))

        def __setattr__(self, name, value):
            object.__setattr__(self, name, value)
            for callback in list(self._observers.values()):
                callback(self, vtk.vtkCommand.ModifiedEvent)

        def AddObserver(self, event, callback, priority=0.0):
            tag = len(self._observers) + 1
            self._observers[tag] = callback
            return tag

        def RemoveObserver(self, tag):
            self._observers.pop(tag, None)

        def connectGui(self, ui):
            return "gui"

        def disconnectGui(self, tag):
            pass

    Wrapped.__name__ = cls.__name__
    return Wrapped


@pytest.fixture
def ibix(monkeypatch, slicer_app):
    """IBIX.py imported as Slicer would, with Qt-only pieces replaced by stand-ins; messages recorded."""
    qt = types.ModuleType("qt")
    qt.QTimer = FakeTimer
    FakeTimer.instances = []
    monkeypatch.setitem(sys.modules, "qt", qt)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    monkeypatch.setitem(sys.modules, "slicer.i18n", i18n)
    try:
        import importlib

        importlib.import_module("slicer.parameterNodeWrapper")  # Slicer's own, where slicer-core ships it
    except ImportError:
        wrapper = types.ModuleType("slicer.parameterNodeWrapper")
        wrapper.parameterNodeWrapper = standin_parameter_node_wrapper
        wrapper.WithinRange = lambda lo, hi: (lo, hi)
        monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", wrapper)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class Base:
        def __init__(self, *args, **kwargs):
            self.parent = types.SimpleNamespace(isEntered=True)

        def getParameterNode(self):
            return None

    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(slm, name, type(name, (Base,), {}))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    messages = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: messages.append(("error", text)))
    monkeypatch.setattr(slicer.util, "warningDisplay", lambda text, **kw: messages.append(("warning", text)))
    answers = []  # what the user answers to confirmOkCancelDisplay (False when the test gave none)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay",
                        lambda text, **kw: messages.append(("question", text)) or (answers.pop(0) if answers else False))
    monkeypatch.delitem(sys.modules, "IBIX", raising=False)
    import IBIX

    monkeypatch.setattr(IBIX.dependencies, "ensure", lambda runtime, prompt=True: "ready")
    IBIX.messages = messages
    IBIX.answers = answers
    IBIX.widgets = []
    standbys = []
    real_standby = jobs.Standby

    def recorded(*args, **kwargs):
        standbys.append(real_standby(*args, **kwargs))
        return standbys[-1]

    monkeypatch.setattr(jobs, "Standby", recorded)
    yield IBIX
    for widget in IBIX.widgets:
        widget.cleanup()
    for standby in standbys:  # engine processes kept for a next run end with the test
        standby.stop()
    sys.modules.pop("IBIX", None)


def _widget(ibix):
    widget = ibix.IBIXWidget()
    ibix.widgets.append(widget)
    widget.ui = FakeUI()
    widget.logic = ibix.IBIXLogic(python=sys.executable)
    widget.setupWidgets()
    return widget


def _drive(widget, deadline=120.0):
    """The event loop: fire the controller's timer until its job has ended."""
    end = time.perf_counter() + deadline
    while widget.controller.job is not None and time.perf_counter() < end:
        widget.controller.timer.fire()
        time.sleep(0.01)
    assert widget.controller.job is None, "the job did not end"


def _loaded(ibix, case):
    widget = _widget(ibix)
    widget.ui.modelPathLineEdit.currentPath = str(case["model"])
    widget.onLoadModel()
    assert widget.controller.job is not None and not widget.ui.loadModelButton.enabled  # busy while the child checks
    assert widget.ui.progressBar.maximum == 0
    _drive(widget)
    return widget


def _buttons(widget):
    ui = widget.ui
    return {name: getattr(ui, name).enabled for name in ("loadModelButton", "generateOutputButton",
                                                         "runForwardButton", "runBackwardButton", "cancelButton")}


# ------------------------------------------------------------------------------------------------------------------
# The module file
# ------------------------------------------------------------------------------------------------------------------

def test_module_imports_the_engine_under_an_alias_without_importlib():
    """Issue 11 (8): the engine is ``import IBIXLogic as ibx``; no importlib indirection; helpers in IBIXLib;
    the widget binds to the controller, which no Qt or trame reaches."""
    source = MODULE.read_text()
    assert "importlib" not in source
    assert not (Path(MODULE_DIR).parent / "IBIXLogic" / "mrml.py").exists()
    froms = {n.module for n in ast.parse(source).body if isinstance(n, ast.ImportFrom)}
    assert "IBIXLib" in froms and "slicer.i18n" in froms
    for name in ("logic.py", "controller.py"):
        tree = ast.parse((MODULE_DIR / "IBIXLib" / name).read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & {"qt", "ctk", "trame", "trame_slicer", "importlib"}, (name, imported)
    logic_imports = [(a.name, a.asname) for n in ast.parse((MODULE_DIR / "IBIXLib" / "logic.py").read_text()).body
                     if isinstance(n, ast.Import) for a in n.names]
    assert ("IBIXLogic", "ibx") in logic_imports


def test_user_visible_strings_are_translatable():
    """Status texts, titles and messages go through _() as in Slicer's module template (the module, its logic and
    the controller that both faces show)."""
    calls = 0
    for path in (MODULE, MODULE_DIR / "IBIXLib" / "logic.py", MODULE_DIR / "IBIXLib" / "controller.py"):
        tree = ast.parse(path.read_text())
        calls += sum(1 for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                     and n.func.id == "_")
        for node in ast.walk(tree):  # every _setStatus with a literal text wraps it in _()
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "_setStatus":
                assert not isinstance(node.args[0], ast.Constant), ast.unparse(node)
    assert calls >= 40


def test_engine_has_no_slicer_import():
    engine = Path(MODULE_DIR).parent / "IBIXLogic"
    for path in engine.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("slicer", "qt", "ctk", "vtk") for n in names), (path.name, names)


# ------------------------------------------------------------------------------------------------------------------
# The widget's state machine
# ------------------------------------------------------------------------------------------------------------------

def test_model_check_runs_in_the_engine_process_and_shows_the_provider(ibix, case):
    widget = _widget(ibix)
    assert _buttons(widget) == {"loadModelButton": True, "generateOutputButton": False, "runForwardButton": False,
                                "runBackwardButton": False, "cancelButton": False}
    widget = _loaded(ibix, case)
    assert "T1" in widget.ui.cardSummaryLabel.text and "2D" in widget.ui.cardSummaryLabel.text
    assert widget.ui.deviceLabel.text == "cpu (CPUExecutionProvider)"
    assert widget.ui.inputVolumeLabel0.text == "T1 volume:" and not widget.ui.inputVolumeSelector1.visible
    assert _buttons(widget)["generateOutputButton"] and not _buttons(widget)["runForwardButton"]
    widget._parameterNode.inputSegmentation = case["seg"]  # ModifiedEvent: the forward button follows
    assert _buttons(widget)["runForwardButton"]


def test_gpu_asked_and_cpu_running_is_said_plainly(ibix, case):
    logic = ibix.IBIXLogic(python=sys.executable)
    logic.modelInfo = {"channels": ["T1"], "device": "cpu", "provider": "CPUExecutionProvider",
                       "requested": "cuda", "spatial_dims": 2, "slice_axis": "axial"}
    assert "GPU was asked for but the CPU runs the model" in logic.deviceSummary()


def test_bad_model_is_an_error_message_and_nothing_is_enabled(ibix, tmp_path):
    widget = _widget(ibix)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    widget.ui.modelPathLineEdit.currentPath = str(bad)
    widget.onLoadModel()
    _drive(widget)
    assert ibix.messages and "bad.onnx" in ibix.messages[-1][1]
    assert not _buttons(widget)["generateOutputButton"] and _buttons(widget)["loadModelButton"]


def test_run_progress_and_finish(ibix, case, fake_child):
    widget = _loaded(ibix, case)
    p = widget._parameterNode
    p.inputVolume0, p.inputSegmentation, p.inputSegmentId = case["volume"], case["seg"], case["sid"]
    fake_child.setenv("IBIX_FAKE", "pause")  # the engine waits after its progress until the test has seen it
    widget.ui.runForwardButton.emit("clicked(bool)", True)
    busy = _buttons(widget)
    assert busy == {"loadModelButton": False, "generateOutputButton": False, "runForwardButton": False,
                    "runBackwardButton": False, "cancelButton": True}
    seen = []
    while widget.controller.job is not None:
        widget.controller.timer.fire()
        seen.append((widget.ui.progressBar.value, widget.ui.progressBar.maximum))
        if seen[-1] == (2, 3):
            open(os.path.join(widget.controller.job.folder, "go-on"), "w").close()
        time.sleep(0.01)
    assert (2, 3) in seen  # the child's progress reached the bar
    assert p.resultVolume is not None and p.resultVolume.GetAttribute("IBIX.kind") == "forward"
    assert "forward done" in widget.ui.statusLabel.text and "7 evaluations" in widget.ui.statusLabel.text
    table = widget.ui.statisticsLabel.text  # the run's map statistics, from its summary.json
    for text in ("reach95", "4.5 mm", "inside the mask", "62.5 %", "peak value", "1.75", "(-1.0, 2.5, 3.0) mm"):
        assert text in table, (text, table)
    assert json.loads(p.resultVolume.GetAttribute("IBIX.statistics"))["reach95_mm"] == 4.5
    assert _buttons(widget)["runForwardButton"] and not _buttons(widget)["cancelButton"]
    assert not widget.controller.timer.active


@pytest.mark.parametrize("mode, text", [("fail", "n_jitters must be at least 1"), ("crash", "stopped unexpectedly")])
def test_failure_and_crash_are_messages_and_the_scene_is_unchanged(ibix, case, fake_child, mode, text):
    widget = _loaded(ibix, case)
    fake_child.setenv("IBIX_FAKE", mode)
    p = widget._parameterNode
    p.inputVolume0, p.inputSegmentation, p.inputSegmentId = case["volume"], case["seg"], case["sid"]
    before = scene_snapshot(case["app"], case["volume"], case["seg"], [case["sid"]])
    widget.ui.runForwardButton.emit("clicked(bool)", True)
    _drive(widget)
    assert ibix.messages[-1][0] == "error" and text in ibix.messages[-1][1]
    assert text in widget.ui.statusLabel.text
    assert_scene_unchanged(before, scene_snapshot(case["app"], case["volume"], case["seg"], [case["sid"]]))
    assert _buttons(widget)["runForwardButton"]


def test_cancel_ends_the_run_and_leaves_the_scene_unchanged(ibix, case, fake_child):
    widget = _loaded(ibix, case)
    fake_child.setenv("IBIX_FAKE", "hang")
    p = widget._parameterNode
    p.inputVolume0, p.inputSegmentation, p.inputSegmentId = case["volume"], case["seg"], case["sid"]
    before = scene_snapshot(case["app"], case["volume"], case["seg"], [case["sid"]])
    widget.ui.runForwardButton.emit("clicked(bool)", True)
    widget.controller.timer.fire()
    widget.ui.cancelButton.emit("clicked(bool)", True)
    assert widget.ui.statusLabel.text == "Cancelling..."
    _drive(widget)
    assert widget.ui.statusLabel.text.startswith("Cancelled")
    assert not any(kind == "error" for kind, _ in ibix.messages)
    assert_scene_unchanged(before, scene_snapshot(case["app"], case["volume"], case["seg"], [case["sid"]]))
    assert _buttons(widget)["runForwardButton"] and not _buttons(widget)["cancelButton"]


def test_estimate_button_and_the_question_before_a_long_run(ibix, case, fake_child):
    widget = _loaded(ibix, case)
    p = widget._parameterNode
    p.inputVolume0, p.outputSegmentation, p.outputSegmentId = case["volume"], case["seg"], case["sid"]
    assert widget.ui.estimateBackwardButton.enabled and not widget.ui.estimateForwardButton.enabled
    widget.ui.estimateBackwardButton.emit("clicked(bool)", True)
    _drive(widget)
    assert widget.ui.estimateLabel.text == "Predicted: 35 model evaluations, about 2.5 s"
    assert p.resultVolume is None
    fake_child.setenv("IBIX_FAKE", "slow")
    widget.ui.runBackwardButton.emit("clicked(bool)", True)
    _drive(widget)
    assert ibix.messages[-1][0] == "question" and "about 23 min" in ibix.messages[-1][1]
    assert widget.ui.statusLabel.text.startswith("Not run.") and p.resultVolume is None
    assert widget.ui.runBackwardButton.enabled and not widget.ui.cancelButton.enabled
    ibix.answers.append(True)
    widget.ui.runBackwardButton.emit("clicked(bool)", True)
    _drive(widget)
    assert "backward done" in widget.ui.statusLabel.text and p.resultVolume is not None


def test_bad_input_is_refused_before_a_process_starts(ibix, case, fake_child):
    widget = _loaded(ibix, case)
    p = widget._parameterNode
    empty = case["seg"].GetSegmentation().AddEmptySegment("", "empty")
    p.inputVolume0, p.inputSegmentation, p.inputSegmentId = case["volume"], case["seg"], empty
    widget.ui.runForwardButton.emit("clicked(bool)", True)
    assert widget.controller.job is None and "is empty" in ibix.messages[-1][1]


def _manual_widgets(widget):
    """What the widgets synced by hand show (the parameter node wrapper does not connect them)."""
    ui = widget.ui
    return dict(model=ui.modelPathLineEdit.currentPath, runtime=ui.runtimeComboBox.currentIndex,
                normalization=ui.normalizationComboBox.currentText, colormap=ui.colormapComboBox.currentText,
                inputMask=(ui.inputMaskSelector.currentNode(), ui.inputMaskSelector.currentSegmentID()),
                outputMask=(ui.outputMaskSelector.currentNode(), ui.outputMaskSelector.currentSegmentID()))


def _saved_settings(node, case):
    node.modelPath, node.runtime, node.normalization, node.colormap = "/models/saved.onnx", "gpu", "magnitude", "Viridis"
    node.inputSegmentation, node.inputSegmentId = case["seg"], case["sid"]
    node.outputSegmentation, node.outputSegmentId = case["seg"], case["sid"]


SAVED = "/models/saved.onnx", 1, "magnitude", "Viridis"


def test_loading_a_scene_refreshes_every_widget(ibix, case):
    """A loaded scene's IBIX parameter node (a new node, announced by the scene's EndImportEvent) and a parameter
    node changed in place (Slicer copies an imported singleton into the existing one) both reach every widget,
    the ones synced by hand included."""
    widget = _widget(ibix)
    assert _manual_widgets(widget)["model"] == "" and _manual_widgets(widget)["inputMask"] == (None, "")
    saved = ibix.IBIXParameterNode(None)
    _saved_settings(saved, case)
    widget.logic.getParameterNode = lambda: saved
    case["app"].scene.InvokeEvent(slicer.vtkMRMLScene.EndImportEvent)
    assert widget._parameterNode is saved and widget.controller.parameters is saved
    shown = _manual_widgets(widget)
    assert (shown["model"], shown["runtime"], shown["normalization"], shown["colormap"]) == SAVED
    assert shown["inputMask"] == shown["outputMask"] == (case["seg"], case["sid"])
    assert widget.ui.runBackwardButton.enabled is False  # no model loaded yet: nothing to run

    in_place = _widget(ibix)  # the same node object, its fields replaced one by one (ModifiedEvent each)
    _saved_settings(in_place._parameterNode, case)
    shown = _manual_widgets(in_place)
    assert (shown["model"], shown["runtime"], shown["normalization"], shown["colormap"]) == SAVED
    assert shown["inputMask"] == (case["seg"], case["sid"])


@pytest.mark.parametrize("moment", ["running", "finishing"])
def test_closing_the_scene_with_another_module_shown_is_safe(ibix, case, fake_child, moment):
    """Issue 11 (5): the scene closes while a run is in flight and the panel is not shown (no parameter node):
    no exception on any poll, nothing added to the new scene, the GUI is ready again."""
    widget = _loaded(ibix, case)
    if moment == "running":
        fake_child.setenv("IBIX_FAKE", "hang")
    p = widget._parameterNode
    p.inputVolume0, p.inputSegmentation, p.inputSegmentId = case["volume"], case["seg"], case["sid"]
    widget.ui.runForwardButton.emit("clicked(bool)", True)
    widget.exit()  # another module is shown
    widget.parent.isEntered = False
    if moment == "finishing":
        while widget.controller.job.process.poll() == "running":  # the child is done; its result is not loaded yet
            time.sleep(0.01)
    case["app"].scene.Clear(0)  # File > Close scene: the widget's scene observer runs
    assert widget._parameterNode is None
    _drive(widget)
    assert "scene was closed" in widget.ui.statusLabel.text
    assert case["app"].scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0
    assert not any(kind == "error" for kind, _ in ibix.messages)


# ------------------------------------------------------------------------------------------------------------------
# The console API: synchronous and asynchronous calls share the runner
# ------------------------------------------------------------------------------------------------------------------

def test_console_synchronous_and_asynchronous_runs(ibix, case, fake_child):
    logic = ibix.IBIXLogic(python=sys.executable)
    with pytest.raises(ValueError, match="no model loaded"):
        logic.runForward([case["volume"]], case["seg"], case["sid"])
    info = logic.loadModel(str(case["model"]), installDependencies=False)
    assert info["channels"] == ["T1"] and "cpu" in logic.deviceSummary()
    node = logic.runForward([case["volume"]], case["seg"], case["sid"], n_jitters=2)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(node), case["array"] * case["mask"])
    ended = []
    run = logic.startForward([case["volume"]], case["seg"], case["sid"], n_jitters=2, onDone=ended.append)
    assert not run.done and ended == []  # returned at once
    timer = FakeTimer.instances[-1]
    while timer.active:
        timer.fire()
        time.sleep(0.01)
    assert ended == [run] and run.state == "finished" and run.node is not None and logic._pollers == []
    assert run.statistics == {"reach95_mm": 4.5, "inside_fraction": 0.625, "peak": 1.75,
                              "peak_ras_mm": [-1.0, 2.5, 3.0]}
    fake_child.setenv("IBIX_FAKE", "fail")
    with pytest.raises(ValueError, match="n_jitters must be at least 1"):
        logic.runBackward([case["volume"]], None, case["seg"], case["sid"], n_blocks=4)
    fake_child.setenv("IBIX_FAKE", "ok")
    bmap = logic.runBackward([case["volume"]], None, case["seg"], case["sid"], n_blocks=4)
    assert json.loads(bmap.GetAttribute("IBIX.statistics"))["blocks90"] == 3
    output = logic.generateOutput([case["volume"]])
    assert output.GetName() == "output generated from T1"


def test_console_atlas_in_the_engine_process_then_live_backward(ibix, case, tmp_path):
    """runAtlas through the module's runner (real child), startLive answers the segment from it, stopLive."""
    pytest.importorskip("onnxruntime")
    logic = ibix.IBIXLogic(python=sys.executable)
    logic.loadModel(str(case["model"]), installDependencies=False)
    try:
        path = logic.runAtlas([case["volume"]], str(tmp_path / "atlas"), n_blocks=12, n_jitters=1)
        assert path == str(tmp_path / "atlas" / "atlas.npz")
        live = logic.startLive(path, case["volume"], case["seg"], case["sid"])
        expected = ibx.ResponseAtlas.load(path).backward(case["mask"]).map
        np.testing.assert_allclose(slicer.util.arrayFromVolume(live.node), expected, atol=1e-7)
        assert live.active and live.timer.interval == 150
        logic.stopLive()
        assert not live.active and logic._live is None
    finally:
        logic.stopStandby()


def test_live_checkbox_computes_the_atlas_once_then_b_follows_the_output_segment(ibix, case):
    pytest.importorskip("onnxruntime")
    widget = _loaded(ibix, case)
    p = widget._parameterNode
    p.inputVolume0, p.outputSegmentation, p.outputSegmentId = case["volume"], case["seg"], case["sid"]
    p.blocks, p.backwardJitters = 12, 1
    box = widget.ui.liveBackwardCheckBox
    box.checked = True
    box.emit("toggled(bool)", True)
    assert widget.controller.job is not None and widget.controller.job.request.kind == "atlas"  # in the engine process
    _drive(widget)
    live = widget.logic._live
    assert live is not None and live.active and p.resultVolume is live.node, widget.ui.statusLabel.text
    atlas = ibx.ResponseAtlas.load(widget.controller.atlas[1])
    np.testing.assert_allclose(slicer.util.arrayFromVolume(live.node), atlas.backward(case["mask"]).map, atol=1e-7)
    mask = np.zeros(case["array"].shape, np.uint8)
    mask[2, 9:13, 2:6] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, case["seg"], case["sid"], case["volume"])
    live.timer.fire()
    np.testing.assert_allclose(slicer.util.arrayFromVolume(live.node), atlas.backward(mask.astype(bool)).map,
                               atol=1e-7)
    box.checked = False
    box.emit("toggled(bool)", False)
    assert not live.active and widget.logic._live is None
    box.checked = True
    box.emit("toggled(bool)", True)  # the same model, input and blocks: the atlas is reused, nothing runs
    assert widget.controller.job is None and widget.logic._live.active
    assert widget.logic._live.node is live.node  # the same B node again
    widget.logic.stopLive()


def test_gui_parameters_to_engine_parameters(ibix):
    logic = ibix.IBIXLogic()
    p = types.SimpleNamespace(forwardJitters=8, backwardJitters=4, maxJitter=0.0, blocks=500, compactness=0.1,
                              coarseToFine=True, coarseBlocks=50, refineThreshold=0.5, normalization="fraction",
                              signedDisplay=False, progressive=True)
    assert logic.forwardParameters(p) == {"n_jitters": 8, "signed": False, "progressive": True}
    assert logic.backwardParameters(p) == {"n_blocks": 500, "compactness": 0.1, "n_jitters": 4,
                                           "normalization": "fraction", "coarse_blocks": 50, "refine_threshold": 0.5,
                                           "progressive": True}
    p.maxJitter = 2.5
    assert logic.forwardParameters(p)["max_jitter"] == 2.5


# ------------------------------------------------------------------------------------------------------------------
# The self-test on a test machine without ONNX Runtime
# ------------------------------------------------------------------------------------------------------------------

def test_self_test_passes_without_onnxruntime_and_says_inference_was_skipped(ibix, slicer_app, monkeypatch):
    """Issue 11 (2): installs are skipped under --testing; IBIXTest tests the scene side and skips inference."""
    shown = []
    red = types.SimpleNamespace(sliceLogic=lambda: slicer_app.slice_logic)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(
        layoutManager=lambda: types.SimpleNamespace(sliceWidget=lambda name: red),
        testingEnabled=lambda: True, processEvents=lambda: None), raising=False)
    monkeypatch.setattr(ibix.dependencies, "installed_runtime", lambda: None)
    test = ibix.IBIXTest()
    test.delayDisplay = lambda text, *a: shown.append(text)
    test.assertEqual, test.assertIn, test.assertTrue = _eq, _in, _true
    test.assertRaises = pytest.raises
    test.runTest()
    assert any("inference skipped" in text for text in shown), shown


def _eq(a, b):
    assert a == b


def _in(a, b):
    assert a in b


def _true(a):
    assert a


def test_nothing_slow_runs_on_the_gui_thread(ibix, case, fake_child, monkeypatch):
    """Issue 11 (6): no nvidia-smi or other blocking subprocess call in the module; the model is loaded in the
    engine process; a waiting console call keeps Slicer's event loop turning."""
    for path in [MODULE, *sorted((MODULE_DIR / "IBIXLib").glob("*.py"))]:
        source = path.read_text()
        for call in ('"nvidia-smi"', "'nvidia-smi'", "subprocess.run(", "check_output(", ".communicate("):
            assert call not in source, (path.name, call)
    tree = ast.parse(MODULE.read_text())
    assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) and "onnxruntime" in ast.unparse(n)
                   for n in ast.walk(tree))
    events = []
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(processEvents=lambda: events.append(1),
                                                             testingEnabled=lambda: False), raising=False)
    logic = ibix.IBIXLogic(launcher=jobs.subprocess_launcher, python=sys.executable)
    logic.loadModel(str(case["model"]), installDependencies=False)
    waited = len(events)
    assert waited > 0  # the model check was waited for with the event loop turning
    logic.runForward([case["volume"]], case["seg"], case["sid"], n_jitters=2)
    assert len(events) > waited


def test_self_test_runs_the_demo_model_where_onnxruntime_is_installed(ibix, slicer_app, monkeypatch):
    pytest.importorskip("onnxruntime")
    shown = []
    red = types.SimpleNamespace(sliceLogic=lambda: slicer_app.slice_logic)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(
        layoutManager=lambda: types.SimpleNamespace(sliceWidget=lambda name: red),
        testingEnabled=lambda: True, processEvents=lambda: None), raising=False)
    monkeypatch.setattr(jobs, "default_launcher", lambda: jobs.subprocess_launcher)
    monkeypatch.setattr(jobs, "python_executable", lambda: sys.executable)
    monkeypatch.setattr(ibix.dependencies, "installed_runtime", lambda: "cpu")
    test = ibix.IBIXTest()
    test.delayDisplay = lambda text, *a: shown.append(text)
    test.assertEqual, test.assertIn, test.assertTrue = _eq, _in, _true
    test.assertGreater = lambda a, b: _true(a > b)
    test.assertRaises = pytest.raises
    test.runTest()
    assert shown[-1] == "IBIX test passed", shown
    assert slicer_app.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") >= 4  # input, output, F, B


def test_statistics_table_of_each_map_kind(ibix):
    """Forward: reach95, inside fraction, peak and its location; backward: reach95, blocks90, peak and location;
    an output run or a zero map shows nothing or dashes."""
    def run(kind, statistics):
        return types.SimpleNamespace(request=types.SimpleNamespace(kind=kind), statistics=statistics)

    backward = ibix.IBIXWidget.statisticsText(run("backward", {"reach95_mm": 10.62, "blocks90": 21.0, "peak": 0.25,
                                                                "peak_ras_mm": [-21.04, -40.0, 19.5]}))
    for text in ("10.6 mm", "blocks holding 90 %", "<td>&nbsp;21</td>", "0.25", "(-21.0, -40.0, 19.5) mm"):
        assert text in backward, (text, backward)
    assert "inside the mask" not in backward
    zero = ibix.IBIXWidget.statisticsText(run("forward", {"reach95_mm": None, "inside_fraction": None, "peak": 0.0,
                                                          "peak_ras_mm": None}))
    assert zero.count("&nbsp;-<") == 3
    assert ibix.IBIXWidget.statisticsText(run("output", {})) == ""


# ------------------------------------------------------------------------------------------------------------------
# Cohorts from the console API (a real engine process running ibix cohort)
# ------------------------------------------------------------------------------------------------------------------

def test_cohort_runs_in_the_engine_process_and_a_case_opens_in_the_scene(ibix, slicer_app, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("distributed")
    samples = Path(MODULE_DIR).parent / "Resources" / "SampleData"
    model = Path(MODULE_DIR).parent / "Resources" / "Models" / "t1_to_t2_cae.onnx"
    t1 = samples / "IBIX-T1.nrrd"
    manifest = tmp_path / "manifest.csv"
    mask = samples / "IBIX-T1-input-mask.nrrd"
    manifest.write_text(f"case,input,mask,n_jitters\nventricle,{t1},{mask},1\n"
                        f"missing,{tmp_path / 'no-such.nrrd'},{mask},1\n")
    logic = ibix.IBIXLogic(python=sys.executable)
    with pytest.raises(ValueError, match="manifest not found"):
        logic.startCohort(str(tmp_path / "none.csv"), str(model), str(tmp_path / "out"))
    seen, ended = [], []
    out = tmp_path / "out"
    files = logic.runCohort(str(manifest), str(model), str(out), mapping="forward", workers=1,
                            onProgress=lambda done, total, stage: seen.append((done, total)), onDone=ended.append)
    assert files["cohort_csv"] == str(out / "cohort.csv") and Path(files["report"]).is_file()
    assert (1, 2) in seen or (2, 2) in seen
    assert ended[0].cases == {"total": 2, "failed": 1, "run": 2, "skipped": 0}
    assert "2 cases, 1 failed" in ended[0].status
    rows = {r["case"]: r for r in logic.cohortCases(str(out))}
    assert rows["ventricle"]["status"] == "ok" and rows["missing"]["status"] == "failed"
    before = slicer_app.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    nodes = logic.loadCohortCase(str(out), "ventricle")
    assert [n.GetName() for n in nodes] == ["ventricle input", "ventricle forward signed",
                                            "ventricle forward normalized"]
    assert slicer_app.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == before + 3
    shown = nodes[-1]
    statistics = json.loads(shown.GetAttribute("IBIX.statistics"))
    assert statistics["reach95_mm"] == pytest.approx(rows["ventricle"]["reach95_mm"])
    assert shown.GetDisplayNode().GetColorNode() is not None
    composite = slicer_app.slice_logic.GetSliceCompositeNode()
    assert composite.GetForegroundVolumeID() == shown.GetID()
    assert composite.GetBackgroundVolumeID() == nodes[0].GetID()
    np.testing.assert_allclose(slicer.util.arrayFromVolume(nodes[0]),
                               ibx.read_volume(t1)[0])
    with pytest.raises(ValueError, match="no finished result"):
        logic.loadCohortCase(str(out), "missing")
    # a rerun in the background process skips the finished case
    run = logic.startCohort(str(manifest), str(model), str(out), workers=1, poll=False)
    assert jobs.wait(run) == "finished" and run.cases["skipped"] == 1


def test_cohort_section_runs_a_cohort_and_opens_a_case(ibix, case, tmp_path):
    """The GUI's Cohort section: Run cohort is busy like a run (progress, Cancel), then lists the finished cases;
    Open case loads one into the scene and shows its statistics."""
    pytest.importorskip("distributed")
    samples = Path(MODULE_DIR).parent / "Resources" / "SampleData"
    mask = samples / "IBIX-T1-input-mask.nrrd"
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"case,input,mask,n_jitters\nventricle,{samples / 'IBIX-T1.nrrd'},{mask},1\n"
                        f"missing,{tmp_path / 'no-such.nrrd'},{mask},1\n")
    widget = _widget(ibix)
    assert not widget.ui.runCohortButton.enabled and not widget.ui.openCohortCaseButton.enabled  # no model yet
    widget = _loaded(ibix, case)
    assert widget.ui.runCohortButton.enabled
    ui = widget.ui
    ui.cohortManifestPathLineEdit.currentPath = str(tmp_path / "none.csv")
    ui.cohortOutputPathLineEdit.currentPath = str(tmp_path / "out")
    ui.cohortMappingComboBox.currentText = "forward"
    ui.runCohortButton.emit("clicked(bool)", True)
    assert widget.controller.job is None and "manifest not found" in ibix.messages[-1][1]
    ui.cohortManifestPathLineEdit.currentPath = str(manifest)
    ui.runCohortButton.emit("clicked(bool)", True)
    assert widget.controller.job is not None and ui.cancelButton.enabled and not ui.runCohortButton.enabled
    _drive(widget)
    assert "cohort done: 2 cases, 1 failed" in ui.statusLabel.text, ui.statusLabel.text
    assert widget.controller.cohortCases == ["ventricle"] and ui.cohortCaseComboBox.items == ["ventricle"]
    assert ui.openCohortCaseButton.enabled and ui.runCohortButton.enabled
    ui.cohortCaseComboBox.currentText = "ventricle"
    ui.openCohortCaseButton.emit("clicked(bool)", True)
    assert widget._parameterNode.resultVolume.GetName() == "ventricle forward normalized"
    assert "reach95" in ui.statisticsLabel.text and "inside the mask" in ui.statisticsLabel.text
    assert "Opened case ventricle: 3 volumes" in ui.statusLabel.text
    widget.controller.fillCohortCases(str(tmp_path / "elsewhere"))  # another folder: no cases, nothing to open
    assert widget.controller.cohortCases == [] and not ui.openCohortCaseButton.enabled
