"""MRML bridge: 3D Slicer scene nodes <-> IBIX engine arrays and files.

Importable wherever ``slicer`` (the Slicer application or the ``slicer-core`` wheel) and VTK are available; it never
imports Qt, so it runs in the Slicer Python console, in Slicer's batch mode and in tests that use ``slicer-core``.
It computes nothing: the IBIX engine runs in a separate process (:mod:`IBIXLib.jobs`); this module reads the
scene into a :class:`Request` (arrays, mask, geometry), writes nothing to the scene until :func:`add_result`
creates the result node, and shows maps as coloured overlays.

Conventions
-----------
* MRML stores a volume's geometry as an IJK-to-RAS matrix; the engine (``IBIXLogic.Geometry``) uses the
  ITK/SimpleITK LPS convention. RAS and LPS differ by the sign of the first two physical axes, so
  ``direction_LPS = diag(-1, -1, 1) @ direction_RAS`` and ``origin_LPS = diag(-1, -1, 1) @ origin_RAS``.
* Numpy arrays are in ``slicer.util.arrayFromVolume`` order (k, j, i) = (slices, rows, cols), the same order
  as ``SimpleITK.GetArrayFromImage``.
* Input volumes and segmentations are never modified: a segment that has no binary labelmap (e.g. one made
  from a model) is converted on a temporary copy of the segmentation.
* Backgrounds: a forward map F lives on the model's output (which output voxels react to the painted input
  region), so it is shown over the OUTPUT volume; a backward map B lives on the input (which input regions
  drive the painted output region), so it is shown over the INPUT volume.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

import IBIXLogic as ibx
import slicer
import vtk

__all__ = [
    "ATTRIBUTE_PREFIX", "COLOR_MAPS", "Request",
    "geometry_from_volume_node", "geometry_from_ijk_to_ras", "ijk_to_ras_from_geometry", "array_from_volume_node",
    "mask_from_segment", "segment_name", "prepare_request", "add_result", "Preview",
    "create_volume_node", "show_overlay", "show_volume", "color_node", "set_legend_visibility",
    "set_overlay_opacity",
]

#: Prefix of every node attribute this bridge writes on result nodes.
ATTRIBUTE_PREFIX = "IBIX."

#: Default colour map per result kind (Slicer colour node names).
COLOR_MAPS = {"forward": "Inferno", "backward": "Viridis", "signed": "DivergingBlueRed", "output": "Grey"}

#: Voxels of a map below this fraction of its display range are transparent (|F| for signed maps).
DEFAULT_THRESHOLD = 0.05

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])

# Control points (RGB, evenly spaced) of the colour maps IBIX uses, for an equivalent table where Slicer's own
# colour nodes are not loaded (matplotlib's inferno and viridis at 0, 0.25, 0.5, 0.75, 1).
_CONTROL_POINTS = {
    "Inferno": [(0.001, 0.000, 0.014), (0.341, 0.062, 0.429), (0.735, 0.216, 0.330), (0.978, 0.557, 0.035),
                (0.988, 0.998, 0.645)],
    "Viridis": [(0.267, 0.005, 0.329), (0.230, 0.322, 0.546), (0.128, 0.567, 0.551), (0.369, 0.789, 0.383),
                (0.993, 0.906, 0.144)],
    "DivergingBlueRed": [(0.0, 0.0, 1.0), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0)],
    "Grey": [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0)],
}


# --------------------------------------------------------------------------------------------------------------
# Scene and module logic access (works in the Slicer application and with slicer-core)
# --------------------------------------------------------------------------------------------------------------

def _scene(node=None):
    if node is not None and node.GetScene() is not None:
        return node.GetScene()
    scene = getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise ibx.InputError("no MRML scene: run inside 3D Slicer, or set slicer.mrmlScene to a vtkMRMLScene")
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


def in_scene(node) -> bool:
    """True while ``node`` belongs to a scene that still holds it (False after the scene was closed)."""
    if node is None:
        return False
    scene = node.GetScene()
    return scene is not None and node.GetID() is not None and scene.GetNodeByID(node.GetID()) is node


# --------------------------------------------------------------------------------------------------------------
# Volumes <-> arrays and geometry
# --------------------------------------------------------------------------------------------------------------

def _require_volume(node, what: str = "input volume"):
    if node is None:
        raise ibx.InputError(f"no {what} selected: select a scalar volume")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise ibx.InputError(f"{what} '{node.GetName()}' is a {node.GetClassName()}, not a scalar volume: "
                             "select a scalar (grey-level) volume")
    if node.GetImageData() is None:
        raise ibx.InputError(f"{what} '{node.GetName()}' has no image data: load or select a volume with voxels")
    if node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise ibx.InputError(f"{what} '{node.GetName()}' has "
                             f"{node.GetImageData().GetNumberOfScalarComponents()} components per voxel: "
                             "select a single-component scalar volume")
    _require_no_transform(node, what)
    return node


def _require_no_transform(node, what: str) -> None:
    parent = node.GetParentTransformNode()
    if parent is not None:
        raise ibx.InputError(
            f"{what} '{node.GetName()}' is under the transform '{parent.GetName()}': harden the transform first "
            "(Data module: right-click the node > 'Harden transform', or "
            "slicer.vtkSlicerTransformLogic().hardenTransform(node)), then run again")


def _ijk_to_ras_array(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray, shape: Sequence[int] | None = None) -> ibx.Geometry:
    """Engine geometry (LPS) of a grid given its MRML IJK-to-RAS matrix (4x4, mm)."""
    ijk_to_ras = np.asarray(ijk_to_ras, dtype=float)
    linear = ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise ibx.InputError(f"volume geometry is degenerate (zero spacing): {ijk_to_ras.tolist()}")
    direction_lps = _LPS_FROM_RAS @ (linear / spacing)
    origin_lps = _LPS_FROM_RAS @ ijk_to_ras[:3, 3]
    return ibx.Geometry(tuple(origin_lps), tuple(spacing), direction_lps, tuple(shape) if shape is not None else None)


def ijk_to_ras_from_geometry(geometry: ibx.Geometry) -> np.ndarray:
    """MRML IJK-to-RAS matrix (4x4, mm) of an engine (LPS) geometry."""
    if geometry.dimension != 3:
        raise ibx.InputError(f"a Slicer volume needs a 3D geometry, got {geometry.dimension}D")
    m = np.eye(4)
    m[:3, :3] = _LPS_FROM_RAS @ np.asarray(geometry.direction, float) @ np.diag(geometry.spacing)
    m[:3, 3] = _LPS_FROM_RAS @ np.asarray(geometry.origin, float)
    return m


def geometry_from_volume_node(node) -> ibx.Geometry:
    """Engine geometry (LPS origin/spacing/direction and array shape) of a scalar volume node."""
    _require_volume(node)
    dims = node.GetImageData().GetDimensions()
    return geometry_from_ijk_to_ras(_ijk_to_ras_array(node), tuple(reversed(dims)))


def array_from_volume_node(node, what: str = "input volume") -> tuple[np.ndarray, ibx.Geometry]:
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
    """(bool array in k, j, i order, IJK-to-RAS of that array) of one segment; the segmentation is not modified.

    A segmentation without a binary labelmap (made from models or surfaces) is converted on a temporary copy,
    with the conversion parameters (reference geometry) Slicer would use.
    """
    segmentation = segmentation_node.GetSegmentation()
    binary_name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if not segmentation.ContainsRepresentation(binary_name):
        copy = slicer.vtkSegmentation()
        copy.DeepCopy(segmentation)
        if not copy.CreateRepresentation(binary_name):
            return None, None
        segmentation = copy
    segment = segmentation.GetSegment(segment_id)
    image = segment.GetRepresentation(binary_name) if segment is not None else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        return None, None
    extent = image.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return None, None
    from vtk.util import numpy_support

    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)
    mask = values == segment.GetLabelValue()
    image_to_world = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(image_to_world)
    ijk_to_ras = np.array([[image_to_world.GetElement(r, c) for c in range(4)] for r in range(4)])
    # Array index 0 is the extent's first voxel, not IJK 0.
    offset = np.eye(4)
    offset[:3, 3] = (extent[0], extent[2], extent[4])
    return mask.copy(), ijk_to_ras @ offset


def mask_from_segment(segmentation_node, segment_id: str, reference_node, what: str = "input mask"
                      ) -> tuple[np.ndarray, bool]:
    """Boolean mask of one segment on the reference volume's voxel grid.

    Returns ``(mask, resampled)``; ``resampled`` is True when the segment's labelmap lies on a different grid
    (not just a cropped extent of the same grid) and was resampled (nearest neighbour) onto the reference grid.
    Raises ``InputError`` for a missing or empty segment, or one that does not overlap the reference volume.
    """
    if segmentation_node is None:
        raise ibx.InputError(f"no segmentation selected for the {what}: select a segmentation and a segment")
    if not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise ibx.InputError(f"'{segmentation_node.GetName()}' is not a segmentation node")
    _require_no_transform(segmentation_node, f"segmentation for the {what}")
    if not segment_id or segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise ibx.InputError(f"no segment selected for the {what}: pick a segment of "
                             f"'{segmentation_node.GetName()}' (or paint one in the Segment Editor)")
    reference_geometry = geometry_from_volume_node(reference_node)
    name = segment_name(segmentation_node, segment_id)
    seg_mask, seg_ijk_to_ras = _segment_labelmap(segmentation_node, segment_id)
    if seg_mask is None or not seg_mask.any():
        raise ibx.InputError(f"segment '{name}' of '{segmentation_node.GetName()}' ({what}) is empty: "
                             "paint it in the Segment Editor, then run again")

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
        mask = ibx.resample_mask(seg_mask, geometry_from_ijk_to_ras(seg_ijk_to_ras, seg_mask.shape),
                                 reference_geometry)
    if not mask.any():
        raise ibx.InputError(f"segment '{name}' of '{segmentation_node.GetName()}' ({what}) does not overlap the "
                             f"volume '{reference_node.GetName()}': paint inside the volume, then run again")
    return mask, not same_grid


# --------------------------------------------------------------------------------------------------------------
# Requests: what a run reads from the scene (nothing is written before add_result)
# --------------------------------------------------------------------------------------------------------------

KINDS = ("output", "forward", "backward", "atlas")


@dataclass
class Request:
    """Everything one run needs, read from the scene; holds copies of the voxels, never the live arrays."""

    kind: str                                  # "output", "forward", "backward" or "atlas"
    input_nodes: list
    arrays: list                               # one array per channel, k, j, i order
    geometry: ibx.Geometry
    reference_node: Any                        # the first input volume: the grid of every result
    background_node: Any = None                # what the result is shown over (see the module docstring)
    mask: np.ndarray | None = None
    mask_resampled: bool = False
    segmentation_node: Any = None
    segment_id: str | None = None
    segment_name: str | None = None
    params: dict = field(default_factory=dict)
    display: str = "normalized"                # forward: "normalized" (|F| in [0, 1]) or "signed"
    name: str | None = None

    def scene_alive(self) -> bool:
        """True while every node the run reads is still in its scene (False once the scene was closed)."""
        return all(in_scene(n) for n in [*self.input_nodes, self.segmentation_node] if n is not None)

    def default_name(self, output_channel: str = "output") -> str:
        base = self.reference_node.GetName()
        if self.kind == "forward":
            label = "forward map" if self.display != "signed" else "signed forward map"
            return f"{base} {label} ({self.segment_name})"
        if self.kind == "backward":
            return f"{base} backward map ({self.segment_name})"
        return f"{output_channel} generated from {base}"


def _collect_inputs(channels: Sequence[str], input_nodes) -> tuple[list, list, ibx.Geometry]:
    if input_nodes is None:
        input_nodes = []
    if not isinstance(input_nodes, (list, tuple)):
        input_nodes = [input_nodes]
    input_nodes = list(input_nodes)
    channels = list(channels)
    if not input_nodes or any(n is None for n in input_nodes):
        missing = [c for c, n in zip(channels, input_nodes + [None] * len(channels)) if n is None]
        raise ibx.InputError(f"no input volume selected for channel(s) {', '.join(missing) or channels}: "
                             f"select one volume per model channel ({', '.join(channels)})")
    if len(input_nodes) != len(channels):
        raise ibx.InputError(f"the model card expects {len(channels)} input channel(s) ({', '.join(channels)}) but "
                             f"{len(input_nodes)} volume(s) were selected: select one volume per channel")
    arrays, geometries = [], []
    for channel, node in zip(channels, input_nodes):
        a, g = array_from_volume_node(node, f"input volume for channel {channel}")
        arrays.append(a)
        geometries.append(g)
    for channel, node, g in zip(channels[1:], input_nodes[1:], geometries[1:]):
        if not g.matches(geometries[0]):
            raise ibx.InputError(f"input volume '{node.GetName()}' (channel {channel}) is not on the same voxel grid "
                                 f"as '{input_nodes[0].GetName()}': resample it (Resample Scalar/Vector/DWI Volume "
                                 "or Crop Volume) onto the first channel's grid")
    return input_nodes, arrays, geometries[0]


def prepare_request(kind: str, channels: Sequence[str], input_nodes, segmentation_node=None,
                    segment_id: str | None = None, output_node=None, display: str = "normalized",
                    name: str | None = None, **params) -> Request:
    """Read what a run needs from the scene (main thread); the scene is not changed.

    Parameters
    ----------
    kind : {"output", "forward", "backward", "atlas"}
        Generate the output, forward map F of an input segment, backward map B of an output segment, or the
        response atlas of the input (B of any output segment later, see :mod:`IBIXLib.live`).
    channels : sequence of str
        The model card's input channels (one input volume each, same grid).
    segmentation_node, segment_id
        The painted region: on the input for F, on the generated output for B (taken onto the input grid).
    output_node : vtkMRMLScalarVolumeNode, optional
        The generated output volume; a forward map is shown over it (over the input where there is none).
    display : {"normalized", "signed"}
        Forward maps only: |F| normalised to [0, 1], or F signed in output units.
    params
        Engine parameters of the mapping (n_jitters, max_jitter, n_blocks, ...), passed to the command line.
    """
    if kind not in KINDS:
        raise ibx.InputError(f"unknown run kind {kind!r}: use one of {', '.join(KINDS)}")
    if display not in ("normalized", "signed"):
        raise ibx.InputError(f"display must be 'normalized' or 'signed', got {display!r}")
    input_nodes, arrays, geometry = _collect_inputs(channels, input_nodes)
    reference = input_nodes[0]
    if output_node is not None:
        _require_volume(output_node, "output volume")
    request = Request(kind, input_nodes, arrays, geometry, reference, params=dict(params), display=display,
                      name=name)
    if kind in ("output", "atlas"):
        return request
    what = "input mask" if kind == "forward" else "output mask"
    request.mask, request.mask_resampled = mask_from_segment(segmentation_node, segment_id, reference, what)
    request.segmentation_node, request.segment_id = segmentation_node, segment_id
    request.segment_name = segment_name(segmentation_node, segment_id)
    request.background_node = (output_node or reference) if kind == "forward" else reference
    return request


def add_result(request: Request, array: np.ndarray, geometry: ibx.Geometry, summary: dict | None = None,
               show: bool = True, name: str | None = None, **display):
    """Create the result volume node of a finished run (main thread). Returns the new node.

    ``array``/``geometry``: the result read back from the engine's file. ``summary``: the engine's summary.json
    (model, device, provider, evaluations, ...), kept in node attributes. ``display``: options of
    :func:`show_overlay` (opacity, threshold, legend, colormap). Raises ``IBIXLogic.Cancelled`` when the scene
    that held the inputs was closed meanwhile (nothing is added then).
    """
    if not request.scene_alive():
        raise ibx.Cancelled("the scene was closed during the run; it was cancelled and nothing was written")
    if not geometry.matches(request.geometry):
        raise ibx.InputError(f"the engine's result (shape {geometry.shape}) is not on the input grid "
                             f"(shape {request.geometry.shape}); this is a bug: please report it")
    summary = summary or {}
    array = np.asarray(array)
    if request.kind != "output":
        array = array.astype(np.float32, copy=False)
    label = name or request.name or request.default_name()
    node = create_volume_node(array, geometry, label, scene=_scene(request.reference_node))
    _write_attributes(node, request, summary)
    if show:
        if request.kind == "output":
            show_volume(node, display.get("views"))
        else:
            show_overlay(node, request.background_node, **display)
    return node


def _write_attributes(node, request: Request, summary: dict) -> None:
    model = summary.get("model") or {}
    section = summary.get(request.kind if request.kind != "output" else "predict") or {}
    attrs = {
        "kind": request.kind,
        "model": model.get("path", ""),
        "modelName": (model.get("card") or {}).get("name", ""),
        "inputs": ",".join(n.GetID() for n in request.input_nodes),
        "reference": request.reference_node.GetID(),
        "device": model.get("device", ""),
        "provider": model.get("provider", ""),
        "seconds": str(summary.get("seconds_total", "")),
    }
    if request.kind != "output":
        attrs.update({
            "background": request.background_node.GetID() if request.background_node is not None else "",
            "segmentation": request.segmentation_node.GetID(),
            "segment": request.segment_id,
            "segmentName": request.segment_name,
            "maskResampled": "true" if request.mask_resampled else "false",
            "evaluations": str(section.get("evaluations", "")),
            "parameters": json.dumps(request.params),
            "display": request.display if request.kind == "forward" else "normalized",
            "statistics": json.dumps(section.get("statistics") or {}),
        })
        units = section.get("units")
        if units:
            attrs["units"] = str(units)
    for key, value in attrs.items():
        node.SetAttribute(ATTRIBUTE_PREFIX + key, str(value))


def add_case_maps(case: str, summary: dict, maps, scene=None, **display) -> list:
    """Open a finished cohort case (main thread): its first input as a new volume, then each map file
    ``maps`` = [(role, kind, path)] as a new volume shown over that input, with the run's attributes (kind,
    display, statistics, case). Returns the new nodes, the input first."""
    nodes = []
    background = None
    inputs = summary.get("inputs") or []
    if inputs and os.path.isfile(str(inputs[0])):
        array, geometry = ibx.read_volume(inputs[0])
        background = create_volume_node(array, geometry, f"{case} input", scene=scene)
        background.SetAttribute(ATTRIBUTE_PREFIX + "case", str(case))
        show_volume(background)
        nodes.append(background)
    for role, kind, path in maps:
        array, geometry = ibx.read_volume(path)
        node = create_volume_node(np.asarray(array, np.float32), geometry, f"{case} {role.replace('_', ' ')}",
                                  scene=scene)
        section = summary.get(kind) or {}
        attrs = {"kind": kind, "case": str(case), "display": "signed" if role == "forward_signed" else "normalized",
                 "statistics": json.dumps(section.get("statistics") or {}), "file": path,
                 "background": background.GetID() if background is not None else "",
                 "evaluations": str(section.get("evaluations", "")), "units": str(section.get("units") or "")}
        for key, value in attrs.items():
            node.SetAttribute(ATTRIBUTE_PREFIX + key, value)
        show_overlay(node, background, **display)
        nodes.append(node)
    return nodes


class Preview:
    """The preview map of a progressive run: one temporary node, updated as the engine writes new previews, and
    removed with everything it added (display, colour, legend nodes) and the slice views restored, when the run
    ends; a cancelled or failed run leaves no trace of it."""

    def __init__(self, request: Request, display: dict | None = None):
        self.request, self.display = request, dict(display or {})
        self.node = None
        self._added: list[str] = []
        self._views: list = []

    def show(self, array: np.ndarray, geometry: ibx.Geometry, label: str) -> None:
        """Show (or update) the preview map (main thread); nothing happens once the scene was closed."""
        if not self.request.scene_alive() or not geometry.matches(self.request.geometry):
            return
        array = np.asarray(array, np.float32)
        name = f"{self.request.name or self.request.default_name()} ({label})"
        if self.node is not None and in_scene(self.node):
            slicer.util.updateVolumeFromArray(self.node, array)
            self.node.SetName(name)
            return
        scene = _scene(self.request.reference_node)
        before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
        self._views = [(c.GetID(), c.GetBackgroundVolumeID(), c.GetForegroundVolumeID(), c.GetForegroundOpacity())
                       for c in _slice_composite_nodes(scene)]
        self.node = create_volume_node(array, geometry, name, scene=scene)
        self.node.SetAttribute(ATTRIBUTE_PREFIX + "kind", self.request.kind)
        options = {k: v for k, v in self.display.items() if k != "show"}
        show_overlay(self.node, self.request.background_node, **options)
        self._added = [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())
                       if scene.GetNthNode(i).GetID() not in before]

    def remove(self) -> None:
        """Remove the preview and what it added, and put the slice views back as they were."""
        if self.node is None:
            return
        scene = self.node.GetScene()
        self.node = None
        if scene is None or not self.request.scene_alive():  # the scene was closed and took it along
            return
        for node_id, background, foreground, opacity in self._views:
            composite = scene.GetNodeByID(node_id)
            if composite is not None:
                composite.SetBackgroundVolumeID(background)
                composite.SetForegroundVolumeID(foreground)
                composite.SetForegroundOpacity(opacity)
        for node_id in reversed(self._added):  # legend, colour table, display node, the map
            node = scene.GetNodeByID(node_id)
            if node is not None:
                scene.RemoveNode(node)
        self._added, self._views = [], []


# --------------------------------------------------------------------------------------------------------------
# Nodes and display
# --------------------------------------------------------------------------------------------------------------

def create_volume_node(array: np.ndarray, geometry: ibx.Geometry, name: str, scene=None):
    """Add a NEW vtkMRMLScalarVolumeNode with these voxels (k, j, i order) and this engine geometry.

    Its display node (grey, window = the voxels' range) is made here rather than by CreateDefaultDisplayNodes,
    whose automatic window/level histogram of a whole volume took over 0.1 s on the main thread.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ibx.InputError(f"a result volume needs a 3D array, got shape {array.shape}")
    if geometry.shape is not None and tuple(array.shape) != tuple(geometry.shape):
        raise ibx.InputError(f"result shape {array.shape} does not match the reference grid {geometry.shape}")
    scene = scene or _scene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras_from_geometry(geometry)))
    display = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
    display.AutoWindowLevelOff()
    display.SetAndObserveColorNodeID(color_node("Grey", scene).GetID())
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 1.0)
    if not (np.isfinite(low) and np.isfinite(high)):  # the range of the finite voxels (copying them is slow)
        finite = array[np.isfinite(array)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    display.SetWindowLevelMinMax(low, high if high > low else low + 1.0)
    node.SetAndObserveDisplayNodeID(display.GetID())
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    return node


def _colormap_lut(name: str, n: int = 256) -> np.ndarray:
    """n x 3 RGB in [0, 1] for a colour map name, from a few control points of the map (grey for unknown names).

    Used only where the application has not loaded Slicer's own colour tables (e.g. slicer-core).
    """
    points = np.asarray(_CONTROL_POINTS.get(name, _CONTROL_POINTS["Grey"]), float)
    t = np.linspace(0.0, 1.0, n)
    where = np.linspace(0.0, 1.0, len(points))
    return np.stack([np.interp(t, where, points[:, c]) for c in range(3)], axis=1)


def _table_node(name: str, rgba: np.ndarray, scene):
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(name)
    node.SetTypeToUser()
    node.SetNumberOfColors(len(rgba))
    for i, (r, g, b, a) in enumerate(rgba):
        node.SetColor(i, f"{i}", float(r), float(g), float(b), float(a))
    node.SetAttribute("Category", "IBIX")
    node.SetHideFromEditors(False)
    scene.AddNode(node)
    return node


def _nodes_by_class_and_name(scene, class_name: str, name: str) -> list:
    """The scene's nodes of a class with a name. ``GetNodesByClassByName`` returns a new collection that the
    caller owns (as Slicer's own Python does, it is released here, else every call would leak one)."""
    collection = scene.GetNodesByClassByName(class_name, name)
    collection.UnRegister(None)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


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
        nodes = _nodes_by_class_and_name(scene, "vtkMRMLColorNode", candidate)
        if nodes:
            return nodes[0]
    lut = _colormap_lut(name)
    return _table_node(f"IBIX {name}", np.hstack([lut, np.ones((len(lut), 1))]), scene)


def _rgba_table(node, n: int = 256) -> np.ndarray:
    """n x 4 RGBA in [0, 1] of a colour node (its lookup table, resampled to n entries)."""
    table = node.GetLookupTable() if hasattr(node, "GetLookupTable") else None
    if table is None or table.GetNumberOfTableValues() < 2:
        return np.hstack([_colormap_lut(node.GetName().replace("IBIX ", "")), np.ones((n, 1))])
    values = np.array([table.GetTableValue(i) for i in range(table.GetNumberOfTableValues())], float)
    positions = np.linspace(0, len(values) - 1, n)
    return np.stack([np.interp(positions, np.arange(len(values)), values[:, c]) for c in range(4)], axis=1)


def signed_color_node(name: str, threshold: float, scene=None):
    """A diverging colour table for a signed map, transparent where |F| < threshold x the window's half-width.

    A display threshold is one interval [lower, upper]; for a signed map it would hide one sign. Instead the
    colour table itself is transparent in the band around zero, so both signs above the threshold show.
    """
    scene = scene or _scene()
    label = f"IBIX {name} |F|>={threshold:g}"
    nodes = _nodes_by_class_and_name(scene, "vtkMRMLColorTableNode", label)
    if nodes:
        return nodes[0]
    rgba = _rgba_table(color_node(name, scene))
    position = np.linspace(-1.0, 1.0, len(rgba))  # table entry -> value / half-width of the window
    rgba[:, 3] = np.where(np.abs(position) < threshold, 0.0, rgba[:, 3])
    return _table_node(label, rgba, scene)


def _slice_composite_nodes(scene, views: Sequence[str] | None = None):
    """The slice views' composite nodes (those of the views named in ``views`` only, when given)."""
    nodes = [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
             for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]
    return [n for n in nodes if views is None or n.GetLayoutName() in views]


def show_volume(node, views: Sequence[str] | None = None) -> None:
    """Show a volume as background in every slice view (or in the views named in ``views``)."""
    for composite in _slice_composite_nodes(_scene(node), views):
        composite.SetBackgroundVolumeID(node.GetID())


def show_overlay(map_node, background_node=None, colormap: str | None = None, opacity: float = 0.6,
                 threshold: float | None = None, legend: bool = True, window: tuple[float, float] | None = None,
                 views: Sequence[str] | None = None):
    """Display a map as a coloured foreground over ``background_node`` in every slice view (or in the views whose
    layout names are in ``views``, e.g. the web page's "Input" and "Output").

    colormap: a Slicer colour node name; default Inferno (forward), Viridis (backward), DivergingBlueRed (signed).
    window: display range, default 0..1 for normalised maps and -m..m (m = max |F|) for signed maps.
    threshold: fraction of the display range below which voxels are transparent (default 0.05); for signed maps
    it applies to |F| / m, so negative and positive values above it both show.
    legend: add the Colors module's default colour legend (where that module logic is available).
    Background: pass the output volume for a forward map and the input volume for a backward map.
    """
    scene = _scene(map_node)
    kind = map_node.GetAttribute(ATTRIBUTE_PREFIX + "kind") or "forward"
    signed = (map_node.GetAttribute(ATTRIBUTE_PREFIX + "display") == "signed")
    colormap = colormap or COLOR_MAPS["signed" if signed else kind if kind in COLOR_MAPS else "forward"]
    threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    display = map_node.GetDisplayNode()
    was = display.StartModify()
    display.AutoWindowLevelOff()
    if window is None:
        if signed:
            m = float(np.max(np.abs(slicer.util.arrayFromVolume(map_node)))) or 1.0
            window = (-m, m)
        else:
            window = (0.0, 1.0)
    display.SetWindowLevelMinMax(float(window[0]), float(window[1]))
    if signed:
        display.SetAndObserveColorNodeID(signed_color_node(colormap, threshold, scene).GetID())
        display.SetApplyThreshold(0)
    else:
        display.SetAndObserveColorNodeID(color_node(colormap, scene).GetID())
        lower = window[0] + threshold * (window[1] - window[0])
        display.AutoThresholdOff()
        display.SetApplyThreshold(1 if threshold > 0 else 0)
        display.SetLowerThreshold(float(lower))
        display.SetUpperThreshold(float(abs(window[1])) * 1e6 + 1e6)
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

    for composite in _slice_composite_nodes(scene, views):
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
    """Foreground opacity (0..1) of every slice view."""
    for composite in _slice_composite_nodes(scene or _scene()):
        composite.SetForegroundOpacity(float(opacity))
