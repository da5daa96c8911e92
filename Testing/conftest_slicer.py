"""A Qt-free 3D Slicer scene for tests, built from the ``slicer-core`` wheel, and small analytic ONNX models.

``slicer-core`` ships MRML and the module logics without Qt or the application, so nothing sets
``slicer.mrmlScene`` or ``slicer.modules``. ``SlicerCoreApp`` builds what the application would:
a vtkMRMLScene, a vtkSlicerApplicationLogic with the default colour nodes, the Volumes, Segmentations and
Colors module logics, and a slice view ("Red") with its slice logic for compositing checks; the
``slicer_app`` fixture installs them as ``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()`` (what
``slicer.util`` and the IBIX bridge call) and removes them afterwards.

Import the fixture into a test module with ``from conftest_slicer import slicer_app  # noqa: F401``.
"""
from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest


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
# Analytic ONNX models (built with onnx.helper: opset 17, NCHW, dynamic batch and spatial size)
# ------------------------------------------------------------------------------------------------------------------

def _save(model, card: dict, directory: Path, name: str) -> Path:
    onnx = pytest.importorskip("onnx")
    onnx.checker.check_model(model)
    path = Path(directory) / f"{name}.onnx"
    onnx.save(model, str(path))
    path.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return path


def _card(name: str, channels=("T1",), out="T2", units="a.u.") -> dict:
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
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    c = len(channels)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, "H", "W"])
    if c == 1:
        nodes = [helper.make_node("Identity", ["x"], ["y"])]
        inits = []
    else:
        axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
        nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)]
        inits = [axes]
    graph = helper.make_graph(nodes, "identity", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="ibix-tests")
    model.ir_version = 8
    return _save(model, _card("identity (test)", channels), directory, "identity")


KERNEL = np.array([[0.0, 1.0, 0.0], [1.0, 4.0, 2.0], [0.0, 0.5, 0.0]], dtype=np.float32)


def conv_model(directory: Path, kernel: np.ndarray = KERNEL) -> Path:
    """y = 3x3 convolution (cross-correlation, zero padding 1) of x with a known kernel."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, "H", "W"])
    w = numpy_helper.from_array(np.asarray(kernel, np.float32).reshape(1, 1, 3, 3), name="w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    graph = helper.make_graph([node], "conv3x3", [x], [y], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="ibix-tests")
    model.ir_version = 8
    return _save(model, _card("3x3 convolution (test)"), directory, "conv3x3")
