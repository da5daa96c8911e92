"""MRML bridge: 3D Slicer scene nodes <-> IBIX engine arrays.

Importable wherever ``slicer`` (the Slicer application or the ``slicer-core`` wheel) and VTK are available.
This module never imports Qt, so it runs in the Slicer Python console, in Slicer's batch mode, in a
background-free test process using ``slicer-core``, and it is what the IBIX module's widget and logic call.

Conventions
-----------
* MRML stores a volume's geometry as an IJK-to-RAS matrix; the engine (``IBIXLogic.Geometry``) uses the
  ITK/SimpleITK LPS convention. RAS and LPS differ by the sign of the first two physical axes, so
  ``direction_LPS = diag(-1, -1, 1) @ direction_RAS`` and ``origin_LPS = diag(-1, -1, 1) @ origin_RAS``.
* Numpy arrays are in ``slicer.util.arrayFromVolume`` order (k, j, i) = (slices, rows, cols), the same order
  as ``SimpleITK.GetArrayFromImage``.
* Every run is split in three steps so that a GUI can run the slow middle step in a worker thread:
  ``prepare_*`` (main thread, reads MRML, copies arrays), ``Job.compute`` (any thread, touches no MRML) and
  ``Job.finish`` (main thread, creates the result node). Nothing in the scene changes before ``finish``, so a
  failed or cancelled run leaves the scene as it was. Input volumes and segmentations are never modified.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

import slicer
import vtk

from .errors import Cancelled, InputError
from .geometry import Geometry
from .io import resample_mask

__all__ = [
    "ATTRIBUTE_PREFIX", "COLOR_MAPS", "Job",
    "geometry_from_volume_node", "ijk_to_ras_from_geometry", "array_from_volume_node",
    "mask_from_segment", "segment_name",
    "prepare_forward", "prepare_backward", "prepare_generate",
    "run_forward", "run_backward", "generate_output", "run_in_progress",
    "create_volume_node", "show_overlay", "color_node",
]

#: Prefix of every node attribute this bridge writes on result nodes.
ATTRIBUTE_PREFIX = "IBIX."

#: Default colour map per result kind (Slicer colour node names).
COLOR_MAPS = {"forward": "Inferno", "backward": "Viridis", "signed": "DivergingBlueRed", "output": "Grey"}

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])

#: Held while a Job computes: one IBIX run at a time per process (GUI and console alike), never interleaved.
_RUN_LOCK = threading.Lock()


def run_in_progress() -> bool:
    """True while an IBIX run computes in this process."""
    return _RUN_LOCK.locked()

# matplotlib names used to build an equivalent colour table where Slicer's own colour files are not loaded
# (e.g. the slicer-core wheel has no default colour files).
_MATPLOTLIB_NAMES = {"Inferno": "inferno", "Viridis": "viridis", "Magma": "magma", "Plasma": "plasma",
                     "Cividis": "cividis", "DivergingBlueRed": "RdBu_r", "Grey": "gray"}


# --------------------------------------------------------------------------------------------------------------
# Scene and module logic access (works in the Slicer application and with slicer-core)
# --------------------------------------------------------------------------------------------------------------

def _scene(node=None):
    if node is not None and node.GetScene() is not None:
        return node.GetScene()
    scene = getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise InputError("no MRML scene: run inside 3D Slicer, or set slicer.mrmlScene to a vtkMRMLScene")
    return scene


def _module_logic(name: str):
    """The logic of a loadable module (``volumes``, ``segmentations``, ``colors``), or None."""
    modules = getattr(slicer, "modules", None)
    module = getattr(modules, name, None) if modules is not None else None
    if module is not None:
        try:
            return module.logic()
        except Exception:  # pragma: no cover - module without logic
            return None
    return None


def _ibx():
    import IBIXLogic  # the package this module belongs to; imported lazily to keep import order simple

    return IBIXLogic


# --------------------------------------------------------------------------------------------------------------
# Volumes <-> arrays and geometry
# --------------------------------------------------------------------------------------------------------------

def _require_volume(node, what: str = "input volume"):
    if node is None:
        raise InputError(f"no {what} selected: select a scalar volume")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"{what} '{node.GetName()}' is a {node.GetClassName()}, not a scalar volume: "
                         "select a scalar (grey-level) volume")
    if node.GetImageData() is None:
        raise InputError(f"{what} '{node.GetName()}' has no image data: load or select a volume with voxels")
    if node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise InputError(f"{what} '{node.GetName()}' has "
                         f"{node.GetImageData().GetNumberOfScalarComponents()} components per voxel: "
                         "select a single-component scalar volume")
    _require_no_transform(node, what)
    return node


def _require_no_transform(node, what: str) -> None:
    parent = node.GetParentTransformNode()
    if parent is not None:
        raise InputError(
            f"{what} '{node.GetName()}' is under the transform '{parent.GetName()}': harden the transform first "
            "(Data module: right-click the node > 'Harden transform', or "
            "slicer.vtkSlicerTransformLogic().hardenTransform(node)), then run again")


def _ijk_to_ras_array(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray, shape: Sequence[int] | None = None) -> Geometry:
    """Engine geometry (LPS) of a grid given its MRML IJK-to-RAS matrix."""
    ijk_to_ras = np.asarray(ijk_to_ras, dtype=float)
    linear = ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"volume geometry is degenerate (zero spacing): {ijk_to_ras.tolist()}")
    direction_ras = linear / spacing
    direction_lps = _LPS_FROM_RAS @ direction_ras
    origin_lps = _LPS_FROM_RAS @ ijk_to_ras[:3, 3]
    return Geometry(tuple(origin_lps), tuple(spacing), direction_lps, tuple(shape) if shape is not None else None)


def ijk_to_ras_from_geometry(geometry: Geometry) -> np.ndarray:
    """MRML IJK-to-RAS matrix (4x4) of an engine (LPS) geometry."""
    if geometry.dimension != 3:
        raise InputError(f"a Slicer volume needs a 3D geometry, got {geometry.dimension}D")
    m = np.eye(4)
    m[:3, :3] = _LPS_FROM_RAS @ np.asarray(geometry.direction, float) @ np.diag(geometry.spacing)
    m[:3, 3] = _LPS_FROM_RAS @ np.asarray(geometry.origin, float)
    return m


def geometry_from_volume_node(node) -> Geometry:
    """Engine geometry (LPS origin/spacing/direction and array shape) of a scalar volume node."""
    _require_volume(node)
    dims = node.GetImageData().GetDimensions()
    return geometry_from_ijk_to_ras(_ijk_to_ras_array(node), tuple(reversed(dims)))


def array_from_volume_node(node, what: str = "input volume") -> tuple[np.ndarray, Geometry]:
    """A copy of the node's voxels (k, j, i order) and its engine geometry. The node is not modified."""
    _require_volume(node, what)
    array = np.array(slicer.util.arrayFromVolume(node), copy=True)
    return array, geometry_from_volume_node(node)


def _vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


# --------------------------------------------------------------------------------------------------------------
# Segments -> masks
# --------------------------------------------------------------------------------------------------------------

def segment_name(segmentation_node, segment_id: str) -> str:
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id) if segmentation_node else None
    return segment.GetName() if segment is not None else str(segment_id)


def _segment_labelmap(segmentation_node, segment_id: str):
    """(bool array in k, j, i order, IJK-to-RAS of that array) of one segment, read without modifying it."""
    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(segment_id)
    binary_name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if not segmentation.ContainsRepresentation(binary_name):
        # Segmentations made from models/surfaces: derive the labelmap Slicer would show.
        segmentation_node.CreateBinaryLabelmapRepresentation()
    image = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        return None, None
    extent = image.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return None, None
    from vtk.util import numpy_support

    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)
    label = segment.GetLabelValue() if hasattr(segment, "GetLabelValue") else 1
    mask = values == label
    image_to_world = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(image_to_world)
    ijk_to_ras = np.array([[image_to_world.GetElement(r, c) for c in range(4)] for r in range(4)])
    # Array index 0 is the extent's first voxel, not IJK 0.
    offset = np.eye(4)
    offset[:3, 3] = (extent[0], extent[2], extent[4])
    return mask, ijk_to_ras @ offset


def mask_from_segment(segmentation_node, segment_id: str, reference_node, what: str = "input mask"
                      ) -> tuple[np.ndarray, bool]:
    """Boolean mask of one segment on the reference volume's voxel grid.

    Returns ``(mask, resampled)``; ``resampled`` is True when the segment's labelmap lies on a different grid
    (not just a cropped extent of the same grid) and was resampled (nearest neighbour) onto the reference grid.
    Raises ``InputError`` for a missing or empty segment, or one that does not overlap the reference volume.
    """
    if segmentation_node is None:
        raise InputError(f"no segmentation selected for the {what}: select a segmentation and a segment")
    if not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise InputError(f"'{segmentation_node.GetName()}' is not a segmentation node")
    _require_no_transform(segmentation_node, f"segmentation for the {what}")
    if not segment_id or segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise InputError(f"no segment selected for the {what}: pick a segment of "
                         f"'{segmentation_node.GetName()}' (or paint one in the Segment Editor)")
    reference_geometry = geometry_from_volume_node(reference_node)
    name = segment_name(segmentation_node, segment_id)
    seg_mask, seg_ijk_to_ras = _segment_labelmap(segmentation_node, segment_id)
    empty_message = (f"segment '{name}' of '{segmentation_node.GetName()}' ({what}) is empty: "
                     "paint it in the Segment Editor, then run again")
    if seg_mask is None or not seg_mask.any():
        raise InputError(empty_message)

    ref_ijk_to_ras = _ijk_to_ras_array(reference_node)
    shape = reference_geometry.shape
    # reference IJK -> segment array index (i, j, k order)
    ref_to_seg = np.linalg.inv(seg_ijk_to_ras) @ ref_ijk_to_ras
    linear, translation = ref_to_seg[:3, :3], ref_to_seg[:3, 3]
    same_grid = (np.allclose(linear, np.eye(3), atol=1e-4)
                 and np.allclose(translation, np.round(translation), atol=1e-3))
    seg_shape_ijk = seg_mask.shape[::-1]
    mask = np.zeros(shape, dtype=bool)
    if same_grid:
        t = np.round(translation).astype(int)  # segment index = reference index + t
        lo = [max(0, -t[a]) for a in range(3)]
        hi = [min(shape[::-1][a], seg_shape_ijk[a] - t[a]) for a in range(3)]
        if all(h > l for l, h in zip(lo, hi)):
            mask[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = seg_mask[
                lo[2] + t[2]:hi[2] + t[2], lo[1] + t[1]:hi[1] + t[1], lo[0] + t[0]:hi[0] + t[0]]
    else:
        mask = resample_mask(seg_mask, geometry_from_ijk_to_ras(seg_ijk_to_ras, seg_mask.shape), reference_geometry)
    if not mask.any():
        raise InputError(f"segment '{name}' of '{segmentation_node.GetName()}' ({what}) does not overlap the "
                         f"volume '{reference_node.GetName()}': paint inside the volume, then run again")
    return mask, not same_grid


# --------------------------------------------------------------------------------------------------------------
# Jobs: prepare (main thread) -> compute (any thread) -> finish (main thread)
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One IBIX run. ``compute`` touches no MRML; ``finish`` creates the result node (main thread only)."""

    kind: str                                  # "forward", "backward" or "output"
    model: Any
    arrays: list
    geometry: Geometry
    reference_node: Any
    input_nodes: list
    mask: np.ndarray | None = None
    mask_resampled: bool = False
    segmentation_node: Any = None
    segment_id: str | None = None
    segment_name: str | None = None
    params: dict = field(default_factory=dict)
    display: str = "normalized"                # forward: "normalized" (|F| in [0, 1]) or "signed"
    name: str | None = None
    result: Any = None
    seconds: float = 0.0
    preview: tuple | None = None               # (map, N) from the worker thread, shown by show_preview()
    preview_node: Any = None
    _preview_shown: int = 0
    _preview_nodes: list = field(default_factory=list)
    _views_before: list = field(default_factory=list)
    scene_closed: threading.Event = field(default_factory=threading.Event, repr=False)
    _observer: Any = field(default=None, repr=False)

    def watch_scene(self) -> None:
        """Cancel the run when its scene starts closing (main thread).

        The ``run_*`` functions watch for the duration of the run; a GUI that computes in a worker thread calls
        this before starting the worker and ``unwatch_scene`` (or ``finish``) afterwards, so that no observer
        outlives the run.
        """
        if self._observer is not None or self.reference_node is None:
            return
        scene = self.reference_node.GetScene()
        if scene is None:
            return
        closed = self.scene_closed
        tag = scene.AddObserver(slicer.vtkMRMLScene.StartCloseEvent, lambda caller, event: closed.set())
        self._observer = (scene, tag)

    def unwatch_scene(self) -> None:
        """Remove the scene observer (main thread); ``finish`` and the ``run_*`` functions call it."""
        if self._observer is not None:
            scene, tag = self._observer
            scene.RemoveObserver(tag)
            self._observer = None

    @property
    def status(self) -> str:
        """One line for a status bar: evaluations, time, device, and whether the mask was resampled."""
        if self.result is None:
            return ""
        evaluations = getattr(self.result, "evaluations", None)
        device = getattr(self.result, "device", None) or getattr(self.model, "device", "")
        parts = [f"{self.kind} done"]
        if evaluations is not None:
            parts.append(f"{evaluations} evaluations")
        parts.append(f"{self.seconds:.1f} s")
        if device:
            parts.append(f"on {device}")
        text = ", ".join(parts)
        if self.mask_resampled:
            text += (f"; segment '{self.segment_name}' was on a different grid and was resampled onto "
                     f"'{self.reference_node.GetName()}'")
        return text

    def compute(self, progress: Callable | None = None, cancel=None):
        """Run the engine (no MRML access; safe in a worker thread). Raises ``IBIXLogic.Cancelled``.

        Only one run computes at a time in a process: a second one is refused with an ``InputError``. Closing
        the scene during the run cancels it.
        """
        if not _RUN_LOCK.acquire(blocking=False):
            raise InputError("another IBIX run is in progress: wait for it to finish (or cancel it), then run "
                             "again; IBIX runs one explanation at a time")
        try:
            if self.scene_closed.is_set():
                raise Cancelled("the scene was closed; the run was cancelled and nothing was written")
            return self._compute(progress, self._cancel_or_closed(cancel))
        except Cancelled:
            if self.scene_closed.is_set():
                raise Cancelled("the scene was closed during the run; it was cancelled and nothing was "
                                "written") from None
            raise
        finally:
            _RUN_LOCK.release()

    def _cancel_or_closed(self, cancel):
        closed = self.scene_closed

        def stop() -> bool:
            if closed.is_set():
                return True
            if cancel is None:
                return False
            return bool(cancel.is_set() if hasattr(cancel, "is_set") else cancel())
        return stop

    def _compute(self, progress, cancel):
        ibx = _ibx()
        x = self.arrays[0] if len(self.arrays) == 1 else list(self.arrays)
        start = time.perf_counter()
        if self.kind == "forward":
            self.result = ibx.forward_mapping(self.model, x, self.mask, geometry=self.geometry,
                                              preview=self._store_preview, progress=progress, cancel=cancel,
                                              **self.params)
        elif self.kind == "backward":
            self.result = ibx.backward_mapping(self.model, x, self.mask, geometry=self.geometry,
                                               preview=self._store_preview, progress=progress, cancel=cancel,
                                               **self.params)
        elif self.kind == "output":
            self.result = self.model.predict(x, geometry=self.geometry, progress=progress, cancel=cancel)
        else:  # pragma: no cover
            raise InputError(f"unknown job kind {self.kind!r}")
        self.seconds = time.perf_counter() - start
        return self.result

    def _store_preview(self, values: np.ndarray, n_jitters: int) -> None:
        """The engine's preview callback (worker thread; progressive runs only): keep the latest map."""
        self.preview = (values, n_jitters)

    def result_array(self) -> np.ndarray:
        if self.kind == "forward":
            return self.result.signed if self.display == "signed" else self.result.normalized
        if self.kind == "backward":
            return self.result.map
        return np.asarray(self.result)

    def default_name(self) -> str:
        base = self.reference_node.GetName()
        if self.kind == "forward":
            label = "forward map" if self.display != "signed" else "signed forward map"
            return f"{base} {label} ({self.segment_name})"
        if self.kind == "backward":
            return f"{base} backward map ({self.segment_name})"
        card = self.model.card
        out = (card.output.channels[0] if getattr(card.output, "channels", None) else "output")
        return f"{out} generated from {base}"

    def show_preview(self, opacity: float = 0.6, threshold: float | None = None, legend: bool = True,
                     colormap: str | None = None):
        """Show the latest progressive preview (main thread) in a temporary node that the final map replaces."""
        preview = self.preview
        if preview is None or preview[1] == self._preview_shown:
            return None
        values, n_jitters = preview
        name = f"{self.name or self.default_name()} (preview, N = {n_jitters})"
        if self.preview_node is None:
            scene = _scene(self.reference_node)
            existing = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
            self._views_before = [(c, c.GetBackgroundVolumeID(), c.GetForegroundVolumeID(), c.GetForegroundOpacity())
                                  for c in _slice_composite_nodes(scene)]
            self.preview_node = create_volume_node(np.asarray(values, np.float32), self.geometry, name, scene=scene)
            show_overlay(self.preview_node, self.reference_node, colormap=colormap, opacity=opacity,
                         threshold=threshold, legend=legend)
            self._preview_nodes = [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())
                                   if scene.GetNthNode(i).GetID() not in existing]
        else:
            slicer.util.updateVolumeFromArray(self.preview_node, np.asarray(values, np.float32))
            self.preview_node.SetName(name)
        self._preview_shown = n_jitters
        return self.preview_node

    def remove_preview(self) -> None:
        """Remove the preview node (the final map, a failure or a cancel leaves no trace of it)."""
        if self.preview_node is not None and self.scene_closed.is_set():  # the scene took it with it
            self.preview_node, self._preview_nodes, self._views_before = None, [], []
        if self.preview_node is not None:
            scene = _scene(self.reference_node)
            for composite, background, foreground, opacity in self._views_before:  # the views as they were
                composite.SetBackgroundVolumeID(background)
                composite.SetForegroundVolumeID(foreground)
                composite.SetForegroundOpacity(opacity)
            for node_id in reversed(self._preview_nodes):  # legend, colour table, display nodes, the map
                node = scene.GetNodeByID(node_id)
                if node is not None:
                    scene.RemoveNode(node)
            self.preview_node = None
            self._preview_nodes = []

    def finish(self, show: bool = True, opacity: float = 0.6, threshold: float | None = None,
               legend: bool = True, colormap: str | None = None):
        """Create the result volume node (main thread). Returns the new vtkMRMLScalarVolumeNode."""
        self.unwatch_scene()
        if self.scene_closed.is_set():
            raise Cancelled("the scene was closed during the run; it was cancelled and nothing was written")
        if self.result is None:
            raise InputError("the run has no result yet: call compute() first")
        array = np.asarray(self.result_array())
        if self.kind != "output":
            array = array.astype(np.float32, copy=False)
        node = create_volume_node(array, self.geometry, self.name or self.default_name(),
                                  scene=_scene(self.reference_node))
        self._write_attributes(node)
        if show:
            if self.kind == "output":
                show_volume(node)
            else:
                show_overlay(node, self.reference_node, colormap=colormap, opacity=opacity,
                             threshold=threshold, legend=legend)
        return node

    def _write_attributes(self, node) -> None:
        card = self.model.card
        attrs = {
            "kind": self.kind,
            "model": getattr(self.model, "path", "") or "",
            "modelName": getattr(card, "name", "") or "",
            "inputs": ",".join(n.GetID() for n in self.input_nodes),
            "reference": self.reference_node.GetID(),
            "device": getattr(self.result, "device", None) or getattr(self.model, "device", ""),
            "seconds": f"{self.seconds:.3f}",
        }
        if self.kind != "output":
            attrs.update({
                "segmentation": self.segmentation_node.GetID(),
                "segment": self.segment_id,
                "segmentName": self.segment_name,
                "maskResampled": "true" if self.mask_resampled else "false",
                "evaluations": str(getattr(self.result, "evaluations", "")),
                "parameters": json.dumps(_jsonable(getattr(self.result, "parameters", self.params))),
                "display": self.display if self.kind == "forward" else "normalized",
            })
            units = getattr(self.result, "units", None)
            if units:
                attrs["units"] = str(units)
        for key, value in attrs.items():
            node.SetAttribute(ATTRIBUTE_PREFIX + key, str(value))


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return "array" + str(tuple(value.shape))
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _check_model(model) -> None:
    if model is None:
        raise InputError("no model loaded: choose an ONNX model file (with its .json model card beside it)")


def _collect_inputs(model, input_nodes, reference_node=None):
    _check_model(model)
    if input_nodes is None:
        input_nodes = []
    if not isinstance(input_nodes, (list, tuple)):
        input_nodes = [input_nodes]
    input_nodes = list(input_nodes)
    channels = list(model.card.input.channels)
    if not input_nodes or any(n is None for n in input_nodes):
        missing = [c for c, n in zip(channels, input_nodes + [None] * len(channels)) if n is None]
        raise InputError(f"no input volume selected for channel(s) {', '.join(missing) or channels}: "
                         f"select one volume per model channel ({', '.join(channels)})")
    if len(input_nodes) != len(channels):
        raise InputError(f"the model card expects {len(channels)} input channel(s) ({', '.join(channels)}) but "
                         f"{len(input_nodes)} volume(s) were selected: select one volume per channel")
    arrays, geometries = [], []
    for channel, node in zip(channels, input_nodes):
        a, g = array_from_volume_node(node, f"input volume for channel {channel}")
        arrays.append(a)
        geometries.append(g)
    for channel, node, g in zip(channels[1:], input_nodes[1:], geometries[1:]):
        if not g.matches(geometries[0]):
            raise InputError(f"input volume '{node.GetName()}' (channel {channel}) is not on the same voxel grid "
                             f"as '{input_nodes[0].GetName()}': resample it (Resample Scalar/Vector/DWI Volume "
                             "or Crop Volume) onto the first channel's grid")
    reference_node = reference_node or input_nodes[0]
    geometry = geometry_from_volume_node(reference_node)
    if not geometry.matches(geometries[0]):
        raise InputError(f"reference volume '{reference_node.GetName()}' is not on the input volumes' grid: "
                         "use the first input volume as reference")
    return input_nodes, arrays, geometry, reference_node


def prepare_generate(model, input_nodes, name: str | None = None) -> Job:
    """Read the inputs for ``model.predict`` (main thread)."""
    input_nodes, arrays, geometry, reference = _collect_inputs(model, input_nodes)
    return Job("output", model, arrays, geometry, reference, input_nodes, name=name)


def prepare_forward(model, input_nodes, segmentation_node, segment_id, reference_node=None,
                    display: str = "normalized", name: str | None = None, **params) -> Job:
    """Read inputs and the input mask for a forward mapping F (main thread)."""
    if display not in ("normalized", "signed"):
        raise InputError(f"display must be 'normalized' or 'signed', got {display!r}")
    input_nodes, arrays, geometry, reference = _collect_inputs(model, input_nodes, reference_node)
    mask, resampled = mask_from_segment(segmentation_node, segment_id, reference, "input mask")
    return Job("forward", model, arrays, geometry, reference, input_nodes, mask=mask, mask_resampled=resampled,
               segmentation_node=segmentation_node, segment_id=segment_id,
               segment_name=segment_name(segmentation_node, segment_id), params=dict(params),
               display=display, name=name)


def prepare_backward(model, input_nodes, segmentation_node, segment_id, output_node=None, reference_node=None,
                     name: str | None = None, **params) -> Job:
    """Read inputs and the output mask for a backward mapping B (main thread).

    The output mask is painted on the generated output (``output_node``, same grid as the input); it is taken
    onto the input grid (``reference_node``, default the first input volume) either way.
    """
    input_nodes, arrays, geometry, reference = _collect_inputs(model, input_nodes, reference_node)
    if output_node is not None:
        _require_volume(output_node, "output volume")
    mask, resampled = mask_from_segment(segmentation_node, segment_id, reference, "output mask")
    return Job("backward", model, arrays, geometry, reference, input_nodes, mask=mask, mask_resampled=resampled,
               segmentation_node=segmentation_node, segment_id=segment_id,
               segment_name=segment_name(segmentation_node, segment_id), params=dict(params), name=name)


_DISPLAY_KEYS = ("show", "opacity", "threshold", "legend", "colormap")


def _split_display(params: dict) -> tuple[dict, dict]:
    display = {k: params.pop(k) for k in list(params) if k in _DISPLAY_KEYS}
    return params, display


def run_forward(model, input_nodes, segmentation_node, segment_id, reference_node=None, progress=None,
                cancel=None, **params):
    """Forward mapping F of a painted input segment -> NEW scalar volume node (normalised |F| by default).

    ``params`` go to ``IBIXLogic.forward_mapping`` (n_jitters, max_jitter, channels), except ``display``
    ("normalized" or "signed"), ``name`` and the display options show, opacity, threshold, legend, colormap.
    """
    params, display = _split_display(dict(params))
    job = prepare_forward(model, input_nodes, segmentation_node, segment_id, reference_node, **params)
    return _compute_and_finish(job, progress, cancel, display)


def run_backward(model, input_nodes, segmentation_node, segment_id, output_node=None, reference_node=None,
                 progress=None, cancel=None, **params):
    """Backward mapping B of a painted output segment -> NEW scalar volume node (B in [0, 1], input grid).

    ``params`` go to ``IBIXLogic.backward_mapping`` (n_blocks, compactness, n_jitters, max_jitter, channels,
    blocks, normalization, coarse_blocks, refine_threshold), except ``name`` and the display options.
    """
    params, display = _split_display(dict(params))
    job = prepare_backward(model, input_nodes, segmentation_node, segment_id, output_node, reference_node,
                           **params)
    return _compute_and_finish(job, progress, cancel, display)


def generate_output(model, input_nodes, name: str | None = None, progress=None, cancel=None, show: bool = True):
    """Run the model on the input volumes -> NEW scalar volume node with the output (output units)."""
    job = prepare_generate(model, input_nodes, name=name)
    return _compute_and_finish(job, progress, cancel, {"show": show})


def _compute_and_finish(job: Job, progress, cancel, display: dict):
    job.watch_scene()
    try:
        job.compute(progress=progress, cancel=cancel)
        return job.finish(**display)
    finally:
        job.unwatch_scene()


# --------------------------------------------------------------------------------------------------------------
# Nodes and display
# --------------------------------------------------------------------------------------------------------------

def create_volume_node(array: np.ndarray, geometry: Geometry, name: str, scene=None):
    """Add a NEW vtkMRMLScalarVolumeNode with these voxels (k, j, i order) and this engine geometry."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise InputError(f"a result volume needs a 3D array, got shape {array.shape}")
    if geometry.shape is not None and tuple(array.shape) != tuple(geometry.shape):
        raise InputError(f"result shape {array.shape} does not match the reference grid {geometry.shape}")
    scene = scene or _scene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras_from_geometry(geometry)))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.CreateDefaultDisplayNodes()
    return node


def _colormap_lut(name: str, n: int = 256) -> np.ndarray:
    """n x 3 RGB in [0, 1] for a colour map name (matplotlib if available, else a simple ramp)."""
    try:
        from matplotlib import colormaps

        return np.asarray(colormaps[_MATPLOTLIB_NAMES.get(name, name.lower())](np.linspace(0, 1, n)))[:, :3]
    except Exception:
        t = np.linspace(0, 1, n)[:, None]
        if name == "DivergingBlueRed":
            return np.where(t < 0.5, (1 - 2 * (0.5 - t)) * np.array([1, 1, 1]) + 2 * (0.5 - t) * np.array([0, 0, 1]),
                            (1 - 2 * (t - 0.5)) * np.array([1, 1, 1]) + 2 * (t - 0.5) * np.array([1, 0, 0]))
        return np.hstack([t, t ** 2, 0.3 * (1 - t)]) if name != "Grey" else np.hstack([t, t, t])


def color_node(name: str, scene=None):
    """Slicer's colour node of this name (e.g. Inferno, Viridis, DivergingBlueRed, or any node ID/name).

    Where the application has not loaded that colour table (e.g. slicer-core without colour files), an
    equivalent table named "IBIX <name>" is created once and reused.
    """
    scene = scene or _scene()
    for node_id in (f"vtkMRMLColorTableNodeFile{name}.txt", f"vtkMRMLColorTableNode{name}",
                    f"vtkMRMLProceduralColorNode{name}", name):
        node = scene.GetNodeByID(node_id)
        if node is not None and node.IsA("vtkMRMLColorNode"):
            return node
    for candidate in (name, f"IBIX {name}"):
        nodes = scene.GetNodesByClassByName("vtkMRMLColorNode", candidate)
        if nodes.GetNumberOfItems():
            return nodes.GetItemAsObject(0)
    lut = _colormap_lut(name)
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(f"IBIX {name}")
    node.SetTypeToUser()
    node.SetNumberOfColors(len(lut))
    for i, (r, g, b) in enumerate(lut):
        node.SetColor(i, f"{i}", float(r), float(g), float(b), 1.0)
    node.SetAttribute("Category", "IBIX")
    node.SetHideFromEditors(False)
    scene.AddNode(node)
    return node


def _slice_composite_nodes(scene):
    nodes = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        nodes.append(scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode"))
    return nodes


def show_volume(node) -> None:
    """Show a volume as background in every slice view."""
    for composite in _slice_composite_nodes(_scene(node)):
        composite.SetBackgroundVolumeID(node.GetID())


def show_overlay(map_node, background_node=None, colormap: str | None = None, opacity: float = 0.6,
                 threshold: float | None = None, legend: bool = True, window: tuple[float, float] | None = None):
    """Display a map as a coloured foreground over ``background_node`` in every slice view.

    colormap: a Slicer colour node name; default Inferno (forward), Viridis (backward), DivergingBlueRed (signed).
    window: display range, default 0..1 for normalised maps and -m..m for signed maps.
    threshold: voxels below it are transparent (default 0.05 for normalised maps, none for signed maps).
    legend: add the Colors module's default colour legend (where that module logic is available).
    """
    scene = _scene(map_node)
    kind = map_node.GetAttribute(ATTRIBUTE_PREFIX + "kind") or "forward"
    signed = (map_node.GetAttribute(ATTRIBUTE_PREFIX + "display") == "signed")
    colormap = colormap or COLOR_MAPS["signed" if signed else kind if kind in COLOR_MAPS else "forward"]
    if map_node.GetDisplayNode() is None:
        map_node.CreateDefaultDisplayNodes()
    display = map_node.GetDisplayNode()
    was = display.StartModify()
    display.SetAndObserveColorNodeID(color_node(colormap, scene).GetID())
    display.AutoWindowLevelOff()
    if window is None:
        if signed:
            m = float(np.max(np.abs(slicer.util.arrayFromVolume(map_node)))) or 1.0
            window = (-m, m)
        else:
            window = (0.0, 1.0)
    display.SetWindowLevelMinMax(float(window[0]), float(window[1]))
    if threshold is None:
        threshold = None if signed else 0.05
    if threshold is not None and threshold > window[0]:
        display.AutoThresholdOff()
        display.SetApplyThreshold(1)
        display.SetLowerThreshold(float(threshold))
        display.SetUpperThreshold(float(max(window[1], threshold)) * 1e6 + 1e6)
    else:
        display.SetApplyThreshold(0)
    display.EndModify(was)
    map_node.SetAttribute(ATTRIBUTE_PREFIX + "colormap", colormap)

    if legend:
        colors_logic = _module_logic("colors")
        if colors_logic is not None and hasattr(colors_logic, "AddDefaultColorLegendDisplayNode"):
            legend_node = colors_logic.AddDefaultColorLegendDisplayNode(map_node)
            if legend_node is not None:
                legend_node.SetVisibility(True)
    else:
        set_legend_visibility(map_node, False)

    for composite in _slice_composite_nodes(scene):
        if background_node is not None:
            composite.SetBackgroundVolumeID(background_node.GetID())
        composite.SetForegroundVolumeID(map_node.GetID())
        composite.SetForegroundOpacity(float(opacity))
    return map_node


def set_legend_visibility(map_node, visible: bool) -> None:
    """Show or hide the colour legend of a map (creating it if needed and visible)."""
    colors_logic = _module_logic("colors")
    if colors_logic is None:
        return
    legend_node = None
    if hasattr(colors_logic, "GetColorLegendDisplayNode"):
        legend_node = colors_logic.GetColorLegendDisplayNode(map_node)
    if legend_node is None and visible and hasattr(colors_logic, "AddDefaultColorLegendDisplayNode"):
        legend_node = colors_logic.AddDefaultColorLegendDisplayNode(map_node)
    if legend_node is not None:
        legend_node.SetVisibility(bool(visible))


def set_overlay_opacity(opacity: float, scene=None) -> None:
    for composite in _slice_composite_nodes(scene or _scene()):
        composite.SetForegroundOpacity(float(opacity))
