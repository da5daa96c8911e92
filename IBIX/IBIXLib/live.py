"""Live backward maps: B of the output segment answered from a response atlas while the user paints.

A response atlas (``ibix atlas``, :func:`IBIXLogic.block_response_atlas`) holds every block's response |F(D_k)|,
so B of any output mask is a sum over it: milliseconds, no model evaluation. :class:`LiveBackward` loads the atlas
in the Slicer process (``IBIXLogic.atlas`` and numpy only; ONNX Runtime is not imported and the model is not run),
observes the output segmentation, and rewrites ONE result volume node in place at most every
:data:`INTERVAL_MS` milliseconds (a single-shot timer coalesces the modifications that painting sends).

The atlas cannot check the model here (that would need the model loaded); it is checked against the input
volume's grid, and it is the caller's part to pass the atlas computed for this input (the module computes it).
"""
from __future__ import annotations

import numpy as np
import vtk

import IBIXLogic as ibx
import slicer
from IBIXLogic.atlas import ResponseAtlas

from . import scene

#: Shortest time between two live answers while the segment changes (milliseconds).
INTERVAL_MS = 150


def _default_timer():
    import qt

    return qt.QTimer()


class LiveBackward:
    """Keeps one backward-map node equal to ``atlas.backward(segment mask)`` while the segment is edited.

    Parameters
    ----------
    atlas : str or ResponseAtlas
        The response atlas of this input (a path to ``atlas.npz`` or a loaded atlas).
    input_node : vtkMRMLScalarVolumeNode
        The input volume the atlas was computed on (the grid of B; B is shown over it).
    segmentation_node, segment_id
        The output segment whose mask M^f is answered (taken onto the input grid).
    normalization : {"fraction", "magnitude"}
        As for the backward mapping.
    display : dict, optional
        Display options of :func:`IBIXLib.scene.show_overlay` (colormap, opacity, threshold, legend).
    node : vtkMRMLScalarVolumeNode, optional
        An earlier live B node of this input to write into (default: a new node at the first answer).
    timer : optional
        A Qt-like single-shot timer (default ``qt.QTimer()``); tests pass a stand-in.
    """

    def __init__(self, atlas, input_node, segmentation_node, segment_id: str, normalization: str = "fraction",
                 name: str | None = None, display: dict | None = None, interval_ms: int = INTERVAL_MS, node=None, timer=None):
        self.atlas = atlas if isinstance(atlas, ResponseAtlas) else ResponseAtlas.load(atlas)
        grid = scene.geometry_from_volume_node(input_node)
        if not grid.matches(self.atlas.geometry.with_shape(self.atlas.labels.shape)):
            raise ibx.InputError(f"the response atlas was computed on another grid than '{input_node.GetName()}': "
                                 "compute the atlas of this input volume")
        if (segmentation_node is None or not segment_id
                or segmentation_node.GetSegmentation().GetSegment(segment_id) is None):
            raise ibx.InputError("no output segment selected for the live backward map: pick a segment painted on "
                                 "the output (or add one in the Segment Editor)")
        self.input_node, self.segmentation_node, self.segment_id = input_node, segmentation_node, segment_id
        self.normalization = normalization
        self.name = name or f"{input_node.GetName()} live backward map"
        self.display = dict(display or {})
        self.node = node if node is not None and scene.in_scene(node) else None
        self.result: ibx.BackwardResult | None = None
        self.error = ""
        self.updates = 0
        self._observers: list[tuple] = []
        self.timer = timer if timer is not None else _default_timer()
        self.timer.setSingleShot(True)
        self.timer.setInterval(int(interval_ms))
        self.timer.connect("timeout()", self.update)

    # -- observing ------------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return bool(self._observers)

    def start(self) -> "LiveBackward":
        """Answer now and then at every change of the segment (until :meth:`stop` or the scene closes)."""
        if not self.active:
            node = self.segmentation_node
            # painting sends the segment events; an undo that restores a whole earlier state, only ModifiedEvent
            for event in (slicer.vtkSegmentation.SegmentModified, slicer.vtkSegmentation.RepresentationModified,
                          vtk.vtkCommand.ModifiedEvent):
                self._observers.append((node, node.AddObserver(event, self._changed)))
            mrml = self.input_node.GetScene()
            self._observers.append((mrml, mrml.AddObserver(slicer.vtkMRMLScene.StartCloseEvent, self._closing)))
        self.update()
        return self

    def stop(self) -> None:
        """Stop observing (the B node stays as it is)."""
        for obj, tag in self._observers:
            obj.RemoveObserver(tag)
        self._observers = []
        self.timer.stop()

    def _changed(self, caller=None, event=None) -> None:
        if not self.timer.isActive():  # not restarted: at most one answer per interval while painting goes on
            self.timer.start()

    def _closing(self, caller=None, event=None) -> None:
        self.stop()
        self.node = None

    # -- answering ------------------------------------------------------------------------------------------
    def mask(self) -> np.ndarray:
        """The output segment's mask on the input grid (all False when it is empty)."""
        try:
            mask, _ = scene.mask_from_segment(self.segmentation_node, self.segment_id, self.input_node,
                                              "output mask")
        except ibx.InputError:
            segmentation = self.segmentation_node.GetSegmentation() if self.segmentation_node else None
            if segmentation is None or segmentation.GetSegment(self.segment_id) is None:
                raise
            mask = np.zeros(self.atlas.labels.shape, bool)  # erased: B is 0
        return mask

    def update(self):
        """Answer the segment's current mask from the atlas into the B node (created once); returns the node.

        An error (the segment removed, ...) is kept in ``error`` and leaves the node as it was.
        """
        try:
            mask = self.mask()
            if mask.any():
                self.result = self.atlas.backward(mask, self.normalization)
                array = self.result.map
            else:
                self.result, array = None, np.zeros(self.atlas.labels.shape, np.float32)
        except (ibx.IBIXError, ValueError) as error:
            self.error = str(error)
            return self.node
        self.error = ""
        if self.node is None or not scene.in_scene(self.node):
            self.node = scene.create_volume_node(array, scene.geometry_from_volume_node(self.input_node), self.name,
                                                 self.input_node.GetScene())
            self.node.SetAttribute(scene.ATTRIBUTE_PREFIX + "kind", "backward")
            self.node.SetAttribute(scene.ATTRIBUTE_PREFIX + "live", "1")
            self.node.SetAttribute(scene.ATTRIBUTE_PREFIX + "background", self.input_node.GetID())
            scene.show_overlay(self.node, self.input_node, **self.display)
        else:
            slicer.util.updateVolumeFromArray(self.node, np.ascontiguousarray(array))
        self.updates += 1
        return self.node
