"""IBIXLib.scene (the MRML bridge) on a real MRML scene from slicer-core: geometry, segments to masks, requests,
result nodes and their display. Runs go through IBIXLib.jobs (test_jobs.py)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest_slicer import assert_scene_unchanged, import_slicer_core, scene_snapshot, slicer_app  # noqa: F401

slicer = import_slicer_core()

import IBIXLogic as ibx  # noqa: E402
from IBIXLib import scene as mrml  # noqa: E402

# Anisotropic spacing (0.7, 1.1, 2.5) and a rotated, axis-permuted direction (columns = i, j, k in RAS):
# i runs R->L (LPS-like flip), j runs P->A rotated 30 degrees about S, k runs S.
_C, _S = np.cos(np.pi / 6), np.sin(np.pi / 6)
DIRECTION_RAS = np.array([[-_C, -_S, 0.0], [-_S, _C, 0.0], [0.0, 0.0, 1.0]])
SPACING = np.array([0.7, 1.1, 2.5])
ORIGIN_RAS = np.array([12.5, -30.0, 44.0])
SHAPE = (5, 20, 16)  # slices, rows, cols


def ijk_to_ras(direction=DIRECTION_RAS, spacing=SPACING, origin=ORIGIN_RAS):
    m = np.eye(4)
    m[:3, :3] = direction @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def matrix_of(node):
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


@pytest.fixture
def case(slicer_app, tmp_path):
    """A T1-like volume on an oblique anisotropic grid with two painted segments in one segmentation."""
    rng = np.random.default_rng(7)
    array = (rng.random(SHAPE) * 100).astype(np.float32)
    volume = slicer.util.addVolumeFromArray(array, ijk_to_ras(), name="T1")
    segmentation = slicer_app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "masks")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    mask = np.zeros(SHAPE, np.uint8)
    mask[2, 8:12, 5:9] = 1
    seg_id = segmentation.GetSegmentation().AddEmptySegment("", "Left ventricle")
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, seg_id, volume)
    out_mask = np.zeros(SHAPE, np.uint8)
    out_mask[3, 2:5, 10:14] = 1
    out_id = segmentation.GetSegmentation().AddEmptySegment("", "Output region")
    slicer.util.updateSegmentBinaryLabelmapFromArray(out_mask, segmentation, out_id, volume)
    empty_id = segmentation.GetSegmentation().AddEmptySegment("", "Empty")
    return dict(app=slicer_app, array=array, volume=volume, segmentation=segmentation, seg_id=seg_id,
                mask=mask.astype(bool), out_id=out_id, out_mask=out_mask.astype(bool), empty_id=empty_id,
                tmp=tmp_path)


def assert_same_geometry(node, reference):
    np.testing.assert_allclose(node.GetOrigin(), reference.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(node.GetSpacing(), reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(matrix_of(node), matrix_of(reference), atol=1e-6)
    assert node.GetImageData().GetDimensions() == reference.GetImageData().GetDimensions()


# ------------------------------------------------------------------------------------------------------------------
# Geometry: MRML RAS <-> engine LPS
# ------------------------------------------------------------------------------------------------------------------

def test_geometry_matches_slicer_nrrd_writer_and_simpleitk(case):
    """Our RAS->LPS conversion equals what SimpleITK reads from the NRRD that Slicer itself writes."""
    sitk = pytest.importorskip("SimpleITK")
    volume = case["volume"]
    storage = case["app"].scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    path = case["tmp"] / "t1.nrrd"
    storage.SetFileName(str(path))
    assert storage.WriteData(volume)
    image = sitk.ReadImage(str(path))
    geometry = mrml.geometry_from_volume_node(volume)
    np.testing.assert_allclose(geometry.origin, image.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(geometry.spacing, image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(geometry.direction, np.reshape(image.GetDirection(), (3, 3)), atol=1e-6)
    assert geometry.shape == SHAPE
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), case["array"])
    np.testing.assert_allclose(mrml.ijk_to_ras_from_geometry(geometry), ijk_to_ras(), atol=1e-9)


def test_parent_transform_is_refused_with_the_fix(case):
    transform = case["app"].scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    case["volume"].SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(ibx.InputError, match="harden the transform"):
        mrml.array_from_volume_node(case["volume"])


# ------------------------------------------------------------------------------------------------------------------
# (2) a segmentation on a different geometry is resampled onto the reference grid
# ------------------------------------------------------------------------------------------------------------------

def test_segment_on_other_grid_is_resampled(case):
    scene = case["app"].scene
    volume = case["volume"]
    # A finer, axis-aligned grid covering the volume: 0.5 mm isotropic, identity RAS directions.
    corners = np.array([[i, j, k, 1] for i in (0, SHAPE[2] - 1) for j in (0, SHAPE[1] - 1) for k in (0, SHAPE[0] - 1)])
    ras = (ijk_to_ras() @ corners.T).T[:, :3]
    lo, hi = ras.min(axis=0) - 3, ras.max(axis=0) + 3
    fine_spacing = 0.5
    fine_shape_ijk = np.ceil((hi - lo) / fine_spacing).astype(int) + 1
    fine_matrix = np.eye(4)
    fine_matrix[:3, :3] = np.eye(3) * fine_spacing
    fine_matrix[:3, 3] = lo
    fine = slicer.util.addVolumeFromArray(np.zeros(fine_shape_ijk[::-1], np.uint8), fine_matrix, name="fine")

    # Paint a ball of radius 4 mm around the RAS position of reference voxel (k=2, j=10, i=7).
    centre = (ijk_to_ras() @ np.array([7, 10, 2, 1]))[:3]
    kk, jj, ii = np.indices(fine_shape_ijk[::-1])
    fine_ras = lo + fine_spacing * np.stack([ii, jj, kk], axis=-1)
    ball = (np.linalg.norm(fine_ras - centre, axis=-1) <= 4.0).astype(np.uint8)
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other grid")
    other.SetReferenceImageGeometryParameterFromVolumeNode(fine)
    ball_id = other.GetSegmentation().AddEmptySegment("", "ball")
    slicer.util.updateSegmentBinaryLabelmapFromArray(ball, other, ball_id, fine)

    mask, resampled = mrml.mask_from_segment(other, ball_id, volume)
    assert resampled
    assert mask.shape == SHAPE
    # Every reference voxel whose centre is well inside the ball is in the mask; well outside is not.
    k, j, i = np.indices(SHAPE)
    ref_ras = (ijk_to_ras() @ np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)]))[:3].T
    distance = np.linalg.norm(ref_ras - centre, axis=1).reshape(SHAPE)
    assert mask[distance <= 4.0 - fine_spacing].all()
    assert not mask[distance >= 4.0 + fine_spacing].any()
    assert mask[2, 10, 7]

    # The request says it resampled.
    request = mrml.prepare_request("forward", ["T1"], [volume], other, ball_id, n_jitters=2)
    assert request.mask_resampled


def test_same_grid_cropped_labelmap_is_not_resampled(case):
    mask, resampled = mrml.mask_from_segment(case["segmentation"], case["seg_id"], case["volume"])
    assert not resampled
    np.testing.assert_array_equal(mask, case["mask"])
    mask, _ = mrml.mask_from_segment(case["segmentation"], case["out_id"], case["volume"])
    np.testing.assert_array_equal(mask, case["out_mask"])


# ------------------------------------------------------------------------------------------------------------------
# (3) slice view compositing: overlay colours at hot voxels, background grey elsewhere
# ------------------------------------------------------------------------------------------------------------------

def test_slice_view_composite_shows_overlay_colours(slicer_app):
    scene = slicer_app.scene
    shape = (1, 40, 40)
    background = np.full(shape, 50.0, np.float32)
    matrix = np.diag([1.0, 1.0, 1.0, 1.0])
    volume = slicer.util.addVolumeFromArray(background, matrix, name="input")
    volume.CreateDefaultDisplayNodes()
    display = volume.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 100.0)  # 50 -> mid grey (127/128)

    hot = np.zeros(shape, np.float32)
    hot[0, 10:30, 10:30] = 1.0
    geometry = mrml.geometry_from_volume_node(volume)
    map_node = mrml.create_volume_node(hot, geometry, "T1 forward map (test)", scene=scene)
    map_node.SetAttribute("IBIX.kind", "forward")
    mrml.show_overlay(map_node, volume, opacity=1.0, threshold=0.05, legend=True)

    composite = slicer_app.slice_logic.GetSliceCompositeNode()
    assert composite.GetBackgroundVolumeID() == volume.GetID()
    assert composite.GetForegroundVolumeID() == map_node.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(1.0)
    colour = map_node.GetDisplayNode().GetColorNode()
    assert colour is not None and "Inferno" in colour.GetName()

    rgba = slicer_app.render_slice((120, 120)).astype(int)
    rgb = rgba[..., :3]
    top = np.array(colour.GetLookupTable().GetTableValue(colour.GetLookupTable().GetNumberOfTableValues() - 1))[:3]
    top = np.round(top * 255).astype(int)
    greys = np.all(np.abs(rgb - rgb[..., :1]) <= 1, axis=-1) & (np.abs(rgb[..., 0] - 127) <= 2)
    overlay = np.all(np.abs(rgb - top) <= 3, axis=-1)
    assert overlay.sum() > 0.05 * overlay.size, "the map's top colour does not appear in the slice view"
    assert greys.sum() > 0.05 * greys.size, "the background's grey does not appear in the slice view"
    # Overlay pixels form the hot square; grey pixels surround it (no overlap).
    rows, cols = np.nonzero(overlay)
    centre = rgb.shape[0] // 2, rgb.shape[1] // 2
    assert rows.min() < centre[0] < rows.max() and cols.min() < centre[1] < cols.max()
    assert not (overlay & greys).any()
    # (a voxel or so from the edge the map is interpolated; further out only the background shows)
    assert greys[rows.min() - 8, centre[1]] and greys[rows.max() + 8, centre[1]]
    assert greys[centre[0], cols.min() - 8] and greys[centre[0], cols.max() + 8]

    # Colour legend from the Colors module logic.
    legend = slicer_app.logics["colors"].GetColorLegendDisplayNode(map_node)
    assert legend is not None and legend.GetVisibility()


# ------------------------------------------------------------------------------------------------------------------
# Requests: bad inputs are refused with the fix, and reading never changes the scene
# ------------------------------------------------------------------------------------------------------------------

def _snapshot(case):
    return scene_snapshot(case["app"], case["volume"], case["segmentation"], [case["seg_id"], case["out_id"]])


@pytest.mark.parametrize("mutate, message", [
    ("empty", "is empty"),
    ("no_segment", "no segment selected"),
    ("no_segmentation", "no segmentation selected"),
    ("no_volume", "no input volume selected"),
    ("channels", "expects 2 input channel"),
    ("transform", "harden the transform"),
])
def test_bad_requests_are_refused_and_leave_the_scene_unchanged(case, mutate, message):
    volume, seg, sid = case["volume"], case["segmentation"], case["seg_id"]
    if mutate == "transform":
        transform = case["app"].scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "t")
        volume.SetAndObserveTransformNodeID(transform.GetID())
    before = _snapshot(case)
    args = dict(kind="forward", channels=["T1"], input_nodes=[volume], segmentation_node=seg, segment_id=sid)
    if mutate == "empty":
        args["segment_id"] = case["empty_id"]
    elif mutate == "no_segment":
        args["segment_id"] = ""
    elif mutate == "no_segmentation":
        args["segmentation_node"] = None
    elif mutate == "no_volume":
        args["input_nodes"] = [None]
    elif mutate == "channels":
        args["channels"] = ["water", "fat"]
    with pytest.raises(ibx.IBIXError, match=message):
        mrml.prepare_request(**args, n_jitters=2)
    assert_scene_unchanged(before, _snapshot(case))


def test_request_copies_inputs_in_card_order(case):
    fat_array = case["array"][::-1].copy()
    fat = slicer.util.addVolumeFromArray(fat_array, ijk_to_ras(), name="fat")
    request = mrml.prepare_request("output", ["water", "fat"], [case["volume"], fat])
    np.testing.assert_array_equal(request.arrays[0], case["array"])
    np.testing.assert_array_equal(request.arrays[1], fat_array)
    request.arrays[0][:] = 0  # copies: the volume keeps its voxels
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(case["volume"]), case["array"])
    assert request.geometry.matches(mrml.geometry_from_volume_node(case["volume"]))


def test_closed_surface_segmentation_is_read_without_being_modified(case):
    """Issue 11 (7): a segmentation holding only closed surfaces gets no binary labelmap representation added."""
    scene = case["app"].scene
    source = case["segmentation"]
    surface = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "surfaces")
    surface.SetReferenceImageGeometryParameterFromVolumeNode(case["volume"])
    surface.GetSegmentation().CopySegmentFromSegmentation(source.GetSegmentation(), case["seg_id"])
    closed = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    surface.GetSegmentation().CreateRepresentation(closed)
    surface.GetSegmentation().SetSourceRepresentationName(closed)
    surface.GetSegmentation().RemoveRepresentation(binary)
    assert not surface.GetSegmentation().ContainsRepresentation(binary)
    sid = surface.GetSegmentation().GetNthSegmentID(0)
    before = scene_snapshot(case["app"], case["volume"], surface, [sid])
    mask, _ = mrml.mask_from_segment(surface, sid, case["volume"])
    assert_scene_unchanged(before, scene_snapshot(case["app"], case["volume"], surface, [sid]))
    assert not surface.GetSegmentation().ContainsRepresentation(binary)
    # the surface of the painted box, voxelised again on the volume's grid: inside the box grown by one voxel
    grown = np.zeros(SHAPE, bool)
    grown[1:4, 7:13, 4:10] = True
    assert mask.any() and not mask[~grown].any()


def test_result_background_is_the_output_for_F_and_the_input_for_B(case):
    """Issue 11 (7): F is shown over the generated output volume, B over the input volume."""
    output = slicer.util.addVolumeFromArray(case["array"] * 2, ijk_to_ras(), name="T2 generated")
    composite = case["app"].slice_logic.GetSliceCompositeNode()
    for kind, segment, background in (("forward", case["seg_id"], output),
                                      ("backward", case["out_id"], case["volume"])):
        request = mrml.prepare_request(kind, ["T1"], [case["volume"]], case["segmentation"], segment,
                                       output_node=output)
        node = mrml.add_result(request, np.ones(SHAPE, np.float32), request.geometry, {})
        assert composite.GetBackgroundVolumeID() == background.GetID(), kind
        assert composite.GetForegroundVolumeID() == node.GetID()
        assert node.GetAttribute("IBIX.background") == background.GetID()
        assert_same_geometry(node, case["volume"])
    # without a generated output, F is shown over the input
    request = mrml.prepare_request("forward", ["T1"], [case["volume"]], case["segmentation"], case["seg_id"])
    mrml.add_result(request, np.ones(SHAPE, np.float32), request.geometry, {})
    assert composite.GetBackgroundVolumeID() == case["volume"].GetID()


def test_result_of_a_closed_scene_is_not_added(case):
    request = mrml.prepare_request("forward", ["T1"], [case["volume"]], case["segmentation"], case["seg_id"])
    case["app"].scene.Clear(0)
    with pytest.raises(ibx.Cancelled, match="scene was closed"):
        mrml.add_result(request, np.ones(SHAPE, np.float32), request.geometry, {})
    assert case["app"].scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0


def test_signed_map_threshold_applies_to_the_magnitude_both_signs_show(slicer_app):
    """Issue 11 (3): a signed F with the default threshold shows its negative (blue) and positive (red) values;
    values with |F| below the threshold stay transparent."""
    shape = (1, 40, 40)
    volume = slicer.util.addVolumeFromArray(np.full(shape, 50.0, np.float32), np.eye(4), name="input")
    volume.CreateDefaultDisplayNodes()
    volume.GetDisplayNode().AutoWindowLevelOff()
    volume.GetDisplayNode().SetWindowLevelMinMax(0.0, 100.0)
    signed = np.zeros(shape, np.float32)
    signed[0, 4:16, 4:16] = -2.0
    signed[0, 24:36, 24:36] = 2.0
    signed[0, 18:22, 4:16] = 0.05  # |F| / max = 0.025 < 0.05: hidden
    node = mrml.create_volume_node(signed, mrml.geometry_from_volume_node(volume), "signed F")
    node.SetAttribute("IBIX.kind", "forward")
    node.SetAttribute("IBIX.display", "signed")
    mrml.show_overlay(node, volume, opacity=1.0, threshold=0.05)
    rgb = slicer_app.render_slice((120, 120))[..., :3].astype(int)
    blue = rgb[..., 2] > rgb[..., 0] + 60
    red = rgb[..., 0] > rgb[..., 2] + 60
    grey = np.abs(rgb - rgb[..., :1]).max(axis=-1) <= 1
    assert blue.sum() > 0.03 * blue.size and red.sum() > 0.03 * red.size
    assert abs(int(blue.sum()) - int(red.sum())) < 0.2 * red.sum()  # same area, both signs
    rows, cols = np.nonzero(blue)
    assert cols.max() < rgb.shape[1] * 0.6 or rows.max() < rgb.shape[0] * 0.6
    # the weak band is transparent: as many grey pixels as without it
    signed[0, 18:22, 4:16] = 0.0
    slicer.util.updateVolumeFromArray(node, signed)
    grey_without = np.abs(slicer_app.render_slice((120, 120))[..., :3].astype(int)
                          - slicer_app.render_slice((120, 120))[..., :1].astype(int)).max(axis=-1) <= 1
    assert abs(int(grey.sum()) - int(grey_without.sum())) <= 0.01 * grey.size


def test_colour_lookups_release_the_collections_the_scene_returns(slicer_app):
    """GetNodesByClassByName returns a new collection its caller owns; every lookup releases it (else each colour
    lookup of a run leaked one)."""
    returned = []

    class RecordingScene(slicer.vtkMRMLScene):
        def GetNodesByClassByName(self, class_name, name):
            returned.append(super().GetNodesByClassByName(class_name, name))
            return returned[-1]

    recording = RecordingScene()
    first = mrml.color_node("Inferno", recording)  # not in this bare scene: made once...
    assert mrml.color_node("Inferno", recording) is first  # ...then found by name
    mrml.signed_color_node("DivergingBlueRed", 0.05, recording)
    mrml.signed_color_node("DivergingBlueRed", 0.05, recording)
    assert len(returned) >= 4
    assert [collection.GetReferenceCount() for collection in returned] == [1] * len(returned)  # only ours


def test_slice_view_is_radiological_patient_left_on_screen_right(slicer_app):
    """A map hot only on the patient's left (RAS x < 0) appears on the right half of the axial view."""
    shape = (1, 40, 40)
    ijk = np.diag([1.0, 1.0, 1.0, 1.0])
    ijk[:3, 3] = (-19.5, -19.5, 0.0)  # centred on RAS (0, 0, 0)
    volume = slicer.util.addVolumeFromArray(np.full(shape, 50.0, np.float32), ijk, name="input")
    hot = np.zeros(shape, np.float32)
    hot[0, 15:25, 2:12] = 1.0  # low i = low RAS x = patient left
    map_node = mrml.create_volume_node(hot, mrml.geometry_from_volume_node(volume), "left map")
    mrml.show_overlay(map_node, volume, opacity=1.0)
    rgb = slicer_app.render_slice((100, 100))[..., :3].astype(int)
    coloured = np.any(np.abs(rgb - rgb[..., :1]) > 5, axis=-1)  # non-grey pixels: the overlay
    assert coloured.any()
    cols = np.nonzero(coloured)[1]
    assert cols.min() > rgb.shape[1] // 2
