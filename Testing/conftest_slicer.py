"""A Qt-free 3D Slicer scene for tests, built from the ``slicer-core`` wheel, and small analytic ONNX models.

``slicer-core`` ships MRML and the module logics without Qt or the application, so nothing sets
``slicer.mrmlScene`` or ``slicer.modules``. ``SlicerCoreApp`` builds what the application would:
a vtkMRMLScene, a vtkSlicerApplicationLogic with the default colour nodes, the Volumes, Segmentations and
Colors module logics, and a slice view ("Red") with its slice logic for compositing checks; the
``slicer_app`` fixture installs them as ``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()`` (what
``slicer.util`` and the IBIX bridge call) and removes them afterwards.

Import the fixture into a test module with ``from conftest_slicer import slicer_app  # noqa: F401``. Also here:
scene snapshots (``scene_snapshot``, ``assert_scene_unchanged``) and carded analytic models (``conv_model``,
``identity_model``, built with ``onnx_models``).
"""
from __future__ import annotations

import json
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

#: The Slicer module's folder: ``IBIX.py`` and its helper package ``IBIXLib`` (as Slicer puts it on the path).
MODULE_DIR = Path(__file__).resolve().parents[1] / "IBIX"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))


def import_slicer_core():
    """``slicer`` with MRML, or skip the test (only when slicer-core truly cannot be imported)."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the 'slicer' package found has no MRML (install slicer-core)")
    import slicer.util  # noqa: F401  (slicer-core ships Slicer's util module)

    return slicer


class SlicerCoreApp:
    """Scene + application logic + module logics, as qSlicerCoreApplication sets them up (without Qt)."""

    def __init__(self):
        slicer = import_slicer_core()
        import vtk

        self.slicer = slicer
        self.scene = slicer.vtkMRMLScene()
        # The Slicer application removes a node's display/storage nodes when the node is removed.
        self.scene.AddObserver(slicer.vtkMRMLScene.NodeAboutToBeRemovedEvent, _remove_display_nodes_observer())
        crosshair = slicer.vtkMRMLCrosshairNode()
        crosshair.SetCrosshairName("default")
        self.scene.AddNode(crosshair)

        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        self.app_logic.GetColorLogic().SetMRMLScene(self.scene)
        self.app_logic.GetColorLogic().AddDefaultColorNodes()
        self.app_logic.SetSliceLogics(vtk.vtkCollection())
        self.app_logic.SetViewLogics(vtk.vtkCollection())

        self.logics = {}
        for module, cls, name in (("colors", "vtkSlicerColorLogic", "Colors"),
                                  ("volumes", "vtkSlicerVolumesLogic", "Volumes"),
                                  ("segmentations", "vtkSlicerSegmentationsModuleLogic", "Segmentations")):
            logic = getattr(slicer, cls)()
            logic.SetMRMLApplicationLogic(self.app_logic)
            logic.SetMRMLScene(self.scene)
            self.app_logic.SetModuleLogic(name, logic)
            self.logics[module] = logic
        self.modules = types.SimpleNamespace(
            **{name: types.SimpleNamespace(logic=(lambda logic=logic: logic)) for name, logic in self.logics.items()})

        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.scene, True)
        self.slice_logic = slicer.vtkMRMLSliceLogic()
        self.slice_logic.SetMRMLApplicationLogic(self.app_logic)
        self.slice_logic.SetMRMLScene(self.scene)
        self.slice_node = self.slice_logic.AddSliceNode("Red")
        self.slice_node.SetOrientation("Axial")  # as the application's Red view: patient right on screen left
        self.app_logic.GetSliceLogics().AddItem(self.slice_logic)

    def node_count(self) -> int:
        return self.scene.GetNumberOfNodes()

    def render_slice(self, size=(96, 96)) -> np.ndarray:
        """RGBA image (rows, cols, 4) of the Red slice view's layer composite, fitted to the background."""
        from vtk.util import numpy_support

        self.slice_node.SetDimensions(size[0], size[1], 1)
        self.slice_logic.FitSliceToAll()
        producer = self.slice_logic.GetImageDataConnection().GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(0)
        dims = image.GetDimensions()
        rgba = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
        return rgba.reshape(dims[1], dims[0], -1).copy()


def _remove_display_nodes_observer():
    """Scene observer: remove a node's display nodes with it (as the Slicer application does)."""
    import vtk

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def remove_attached(scene, event, node):
        if scene is None or node is None or not hasattr(node, "GetNumberOfDisplayNodes"):
            return
        for i in reversed(range(node.GetNumberOfDisplayNodes())):
            display = node.GetNthDisplayNode(i)
            if display is not None:
                scene.RemoveNode(display)

    return remove_attached


@pytest.fixture
def slicer_app(monkeypatch):
    """A fresh scene set as ``slicer.mrmlScene`` with module logics as ``slicer.modules.*.logic()``."""
    slicer = import_slicer_core()
    app = SlicerCoreApp()
    monkeypatch.setattr(slicer, "mrmlScene", app.scene, raising=False)
    monkeypatch.setattr(slicer, "modules", app.modules, raising=False)
    yield app
    app.scene.Clear(1)


# ------------------------------------------------------------------------------------------------------------------
# Scene snapshots (what "the scene was left as it was" means in the tests)
# ------------------------------------------------------------------------------------------------------------------

def scene_snapshot(app: SlicerCoreApp, volume, segmentation, segment_ids) -> dict:
    """Node IDs, the volume's voxels and geometry, and each segment's labelmap as stored (not converted)."""
    import vtk
    from vtk.util import numpy_support

    slicer = app.slicer
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    masks = {}
    for sid in segment_ids:
        image = segmentation.GetSegmentation().GetSegment(sid).GetRepresentation(binary)
        masks[sid] = None if image is None else numpy_support.vtk_to_numpy(
            image.GetPointData().GetScalars()).copy()
    return dict(ids=sorted(app.scene.GetNthNode(i).GetID() for i in range(app.node_count())),
                array=slicer.util.arrayFromVolume(volume).copy(),
                matrix=[matrix.GetElement(r, c) for r in range(4) for c in range(4)],
                masks=masks, segments=segmentation.GetSegmentation().GetNumberOfSegments(),
                representations=sorted(_representations(segmentation)))


def _representations(segmentation) -> list:
    seg = segmentation.GetSegmentation()
    return [name for name in ("Binary labelmap", "Closed surface", "Planar contour", "Fractional labelmap")
            if seg.ContainsRepresentation(name)]


def assert_scene_unchanged(before: dict, after: dict) -> None:
    """The same nodes, voxels, geometry, segments and representations as before."""
    assert after["ids"] == before["ids"]
    np.testing.assert_array_equal(after["array"], before["array"])
    assert after["matrix"] == before["matrix"]
    assert after["segments"] == before["segments"]
    assert after["representations"] == before["representations"]
    for sid, mask in before["masks"].items():
        if mask is None:
            assert after["masks"][sid] is None
        else:
            np.testing.assert_array_equal(after["masks"][sid], mask)


# ------------------------------------------------------------------------------------------------------------------
# Analytic ONNX models with a card (from the tests' one model-building module, onnx_models)
# ------------------------------------------------------------------------------------------------------------------

def card(name: str, channels=("T1",), out="T2", units="a.u.") -> dict:
    """A 2D axial card with identity intensity mappings (the model sees the voxel values as they are)."""
    return {
        "ibix_card": 1, "name": name, "description": "analytic test model",
        "spatial_dims": 2, "slice_axis": "axial",
        "input": {"name": "x", "layout": "NCHW", "channels": list(channels),
                  "intensity": {"from": [0.0, 1.0], "to": [0.0, 1.0], "clip": False}},
        "output": {"name": "y", "layout": "NCHW", "channels": [out],
                   "intensity": {"from": [0.0, 1.0], "to": [0.0, 1.0]}, "units": units},
    }


def identity_model(directory: Path, channels=("T1",)) -> Path:
    """y = sum of the input channels (identity for one channel)."""
    pytest.importorskip("onnx")
    import onnx_models

    model = (onnx_models.identity() if len(channels) == 1
             else onnx_models.channel_mix([1.0] * len(channels)))
    return onnx_models.save(model, directory, "identity", card("identity (test)", channels))


def conv_model(directory: Path, kernel: np.ndarray | None = None) -> Path:
    """y = 3x3 zero-padded cross-correlation of x with ``kernel`` (default onnx_models.POSITIVE_KERNEL)."""
    pytest.importorskip("onnx")
    import onnx_models

    kernel = onnx_models.POSITIVE_KERNEL if kernel is None else kernel
    return onnx_models.save(onnx_models.convolution(kernel), directory, "conv3x3", card("3x3 convolution (test)"))



@pytest.fixture
def case(slicer_app, tmp_path):
    """A T1 volume (4x16x12, anisotropic), a segmentation with one painted segment, and a carded 3x3 model."""
    array = np.random.default_rng(5).uniform(1, 2, (4, 16, 12)).astype(np.float32)
    volume = slicer_app.slicer.util.addVolumeFromArray(array, np.diag([0.9, 1.2, 3.0, 1.0]), name="T1")
    seg = slicer_app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "masks")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    sid = seg.GetSegmentation().AddEmptySegment("", "Left ventricle")
    mask = np.zeros(array.shape, np.uint8)
    mask[1, 5:8, 4:7] = 1
    slicer_app.slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, sid, volume)
    model = conv_model(tmp_path)
    return dict(app=slicer_app, array=array, volume=volume, seg=seg, sid=sid, mask=mask.astype(bool), model=model)


# ------------------------------------------------------------------------------------------------------------------
# A stand-in for qt.QTimer (the event loop's part is the test's)
# ------------------------------------------------------------------------------------------------------------------

class FakeTimer:
    """qt.QTimer: the test fires it (the event loop's part)."""

    instances: list = []

    def __init__(self):
        self.active, self.interval, self.slots = False, 0, []
        FakeTimer.instances.append(self)

    def setInterval(self, ms):
        self.interval = ms

    def connect(self, signal, slot):
        self.slots.append(slot)

    def setSingleShot(self, single):
        self.single = single

    def isActive(self):
        return self.active

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    def fire(self):
        if self.active:
            if getattr(self, "single", False):
                self.active = False
            for slot in self.slots:
                slot()


# ------------------------------------------------------------------------------------------------------------------
# A stand-in engine process (exact, fast protocol cases for the runner and the widget)
# ------------------------------------------------------------------------------------------------------------------

#: A stand-in for IBIXLib/child.py: behaves as IBIX_FAKE says; the result is input x mask (F) or the input (others).
#: As child.py, ``serve`` runs jobs one after the other (``job.json`` in its folder, each job ending with its
#: ``job-ended`` line); ``fail`` returns exit code 2 (the process goes on), ``crash`` aborts the process.
FAKE_CHILD = textwrap.dedent('''
    import json, os, sys, time
    import numpy as np
    import SimpleITK as sitk
    argv = sys.argv[1:]
    home = argv[argv.index("--job-folder") + 1]
    STATISTICS = {"forward": {"reach95_mm": 4.5, "inside_fraction": 0.625, "peak": 1.75,
                              "peak_ras_mm": [-1.0, 2.5, 3.0]},
                  "backward": {"reach95_mm": 2.0, "blocks90": 3, "peak": 0.5, "peak_ras_mm": [0.0, 1.0, 2.0]}}

    def job(args):
        mode_file = os.environ.get("IBIX_FAKE_FILE", "")  # read at job time (a standby started earlier)
        mode = open(mode_file).read() if os.path.exists(mode_file) else os.environ.get("IBIX_FAKE", "ok")
        command = args[0]
        if command == "probe":  # the model check: a one-channel 2D model on the CPU
            print(json.dumps({"stage": "finished", "model": {
                "name": "fake", "channels": ["T1"], "spatial_dims": 2, "slice_axis": "axial", "units": "a.u.",
                "output_channels": ["T2"], "device": "cpu", "provider": "CPUExecutionProvider",
                "requested": argv[argv.index("--device") + 1]}}), flush=True)
            return 0
        out = args[args.index("--output") + 1]
        folder = os.path.dirname(out)  # the job's folder
        print("a human message on stderr", file=sys.stderr, flush=True)
        if command in ("forward", "backward", "atlas"):  # the engine's estimate, before any progress
            slow = mode == "slow"
            print(json.dumps({"stage": "estimate", "evaluations": 23000 if slow else 35,
                              "seconds": 1380.0 if slow else 2.5,
                              "advice": ["an NVIDIA GPU", "fewer blocks"] if slow else []}), flush=True)
            if "--estimate" in args:
                print(json.dumps({"stage": "finished", "files": {}}), flush=True)
                return 0
            if slow:  # long enough for the module to cancel it when it sees the estimate
                time.sleep(2)
        for done in range(3):
            print(json.dumps({"stage": command, "done": done, "total": 3}), flush=True)
        while mode == "pause" and not os.path.exists(os.path.join(folder, "go-on")):  # the test looks first
            time.sleep(0.01)
        if mode == "fail":
            print(json.dumps({"stage": "failed", "error": "n_jitters must be at least 1"}), flush=True)
            return 2
        if mode == "crash":
            print("Fatal: CUDA failure 700: an illegal memory access", flush=True)
            os.abort()
        image = sitk.ReadImage(args[args.index("--input") + 1])
        if "--progressive" in args:  # a preview map (as ibix: written under its name, removed at the end)
            os.makedirs(out)
            preview = sitk.GetImageFromArray(np.full(sitk.GetArrayFromImage(image).shape, 0.5, np.float32))
            preview.CopyInformation(image)
            name = {"forward": ".forward_normalized_preview.nrrd", "backward": ".backward_preview.nrrd"}[command]
            sitk.WriteImage(preview, os.path.join(out, "partial.nrrd"))
            os.replace(os.path.join(out, "partial.nrrd"), os.path.join(out, name))
            open(os.path.join(folder, "preview-written"), "w").close()
            while mode == "preview" and not os.path.exists(os.path.join(folder, "go-on")):  # the test looks first
                time.sleep(0.01)
            if mode != "hang":
                os.remove(os.path.join(out, name))
        if mode == "hang":
            open(os.path.join(folder, "hanging"), "w").close()
            time.sleep(600)
        x = sitk.GetArrayFromImage(image).astype(np.float32)
        if "--mask" in args:
            x = x * sitk.GetArrayFromImage(sitk.ReadImage(args[args.index("--mask") + 1]))
        os.makedirs(out, exist_ok=True)
        files = {}
        for role in {"predict": ["output"], "forward": ["forward_signed", "forward_normalized"],
                     "backward": ["backward"]}[command]:
            result = sitk.GetImageFromArray(-x if role == "forward_signed" else x)
            result.CopyInformation(image)
            files[role] = os.path.join(out, role + ".nrrd")
            sitk.WriteImage(result, files[role])
        files["summary"] = os.path.join(out, "summary.json")
        with open(files["summary"], "w") as f:
            json.dump({"command": command, "model": {"device": "cpu", "provider": "CPUExecutionProvider",
                       "card": {"name": "fake"}}, command: {"evaluations": 7, "units": "a.u.",
                       "statistics": STATISTICS.get(command, {})}}, f)
        print(json.dumps({"stage": "finished", "files": files, "summary": files["summary"]}), flush=True)
        return 0

    args = argv[argv.index("--") + 1:]
    if args != ["serve"]:
        sys.exit(job(args))
    # a standby: jobs arrive as job.json, one after the other; it ends with the test process (as child.py)
    parent = int(argv[argv.index("--parent-pid") + 1]) if "--parent-pid" in argv else os.getppid()
    path = os.path.join(home, "job.json")
    while True:
        while not os.path.exists(path):
            try:
                os.kill(parent, 0) if os.name != "nt" else None  # (signal 0 on Windows would end the parent)
            except ProcessLookupError:
                sys.exit(130)
            if os.path.exists(os.path.join(home, "cancel")) or not os.path.isdir(home):
                sys.exit(130)
            time.sleep(0.01)
        handed = json.load(open(path))
        os.remove(path)
        code = job(handed["arguments"])
        print(json.dumps({"stage": "job-ended", "job": handed["job"], "code": code}), flush=True)
''')



class FakeMode:
    """``setenv("IBIX_FAKE", mode)`` for FAKE_CHILD, also read by standby processes started before the call."""

    def __init__(self, monkeypatch, path: Path):
        self.monkeypatch, self.path = monkeypatch, path
        monkeypatch.setenv("IBIX_FAKE_FILE", str(path))
        self.setenv("IBIX_FAKE", "ok")

    def setenv(self, name: str, value: str) -> None:
        self.monkeypatch.setenv(name, value)
        if name == "IBIX_FAKE":
            self.path.write_text(value)

    def __getattr__(self, name):
        return getattr(self.monkeypatch, name)


@pytest.fixture
def fake_child(tmp_path, monkeypatch):
    """Runs use FAKE_CHILD instead of child.py (``IBIX_FAKE`` = ok, fail, crash, hang, slow: estimated at 23 minutes,
    pause: a run waits after its progress until the test writes ``go-on`` in the job folder, or preview: a
    progressive run waits likewise after its preview)."""
    from IBIXLib import jobs

    path = tmp_path / "fake_child.py"
    path.write_text(FAKE_CHILD)
    monkeypatch.setattr(jobs, "CHILD_SCRIPT", str(path))
    monkeypatch.setattr(jobs, "python_executable", lambda: sys.executable)
    _estimate_interface(monkeypatch)
    return FakeMode(monkeypatch, tmp_path / "fake_mode")


def _estimate_interface(monkeypatch):
    """``jobs.Run(..., estimate_only=True)`` and ``run.estimate`` (the engine's ``{"stage": "estimate"}`` record) as
    the engine runner provides them: the real ones where jobs.py has them, else this minimal stand-in of that
    interface (``--estimate`` added to the command line; an estimate-only run reads no map file)."""
    import inspect

    from IBIXLib import jobs

    if "estimate_only" in inspect.signature(jobs.Run.__init__).parameters:
        return
    take = jobs.Process._take

    def _take(process, line):
        if line.startswith('{"stage": "estimate"'):
            process.estimate = json.loads(line)
        else:
            take(process, line)

    arguments = jobs.command_arguments

    def command_arguments(request, *args):
        return arguments(request, *args) + (["--estimate"] if getattr(request, "estimate_only", False) else [])

    class Run(jobs.Run):
        def __init__(self, request, model_path, estimate_only=False, **kw):
            super().__init__(request, model_path, **kw)
            self.estimate_only = request.estimate_only = estimate_only

        @property
        def estimate(self):
            return getattr(self.process, "estimate", None)

        def _read(self):
            if self.estimate_only:
                self._end(jobs.FINISHED, "")
            else:
                super()._read()

    monkeypatch.setattr(jobs.Process, "_take", _take)
    monkeypatch.setattr(jobs, "command_arguments", command_arguments)
    monkeypatch.setattr(jobs, "Run", Run)
