"""IBIXLogic.mrml (the MRML bridge) on a real MRML scene from slicer-core, with analytic ONNX models."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest_slicer import KERNEL, conv_model, identity_model, import_slicer_core, slicer_app  # noqa: F401

slicer = import_slicer_core()
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import IBIXLogic as ibx  # noqa: E402
from IBIXLogic import mrml  # noqa: E402

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
# (1) forward / backward through the bridge == engine on the same arrays; result geometry == reference
# ------------------------------------------------------------------------------------------------------------------

def test_forward_through_bridge_equals_engine(case):
    model = ibx.load_model(conv_model(case["tmp"]), device="cpu")
    volume = case["volume"]
    node = mrml.run_forward(model, [volume], case["segmentation"], case["seg_id"], n_jitters=3)
    assert node.GetName() == "T1 forward map (Left ventricle)"
    assert node.GetAttribute("IBIX.kind") == "forward"
    assert node.GetAttribute("IBIX.segmentName") == "Left ventricle"
    assert node.GetAttribute("IBIX.maskResampled") == "false"
    assert_same_geometry(node, volume)

    expected = ibx.forward_mapping(model, case["array"], case["mask"], n_jitters=3,
                                   geometry=mrml.geometry_from_volume_node(volume))
    np.testing.assert_allclose(slicer.util.arrayFromVolume(node), expected.normalized, rtol=1e-5, atol=1e-6)
    # The 3x3 kernel spreads the mask's influence by one voxel in-plane (2D model: no through-plane reach).
    reacting = slicer.util.arrayFromVolume(node) > 0
    assert reacting[2].any() and not reacting[[0, 1, 3, 4]].any()

    signed = mrml.run_forward(model, [volume], case["segmentation"], case["seg_id"], n_jitters=3,
                              display="signed")
    np.testing.assert_allclose(slicer.util.arrayFromVolume(signed), expected.signed, rtol=1e-5, atol=1e-6)
    assert signed.GetAttribute("IBIX.display") == "signed"


def test_backward_through_bridge_equals_engine(case):
    model = ibx.load_model(conv_model(case["tmp"]), device="cpu")
    volume = case["volume"]
    output = mrml.generate_output(model, [volume])
    assert_same_geometry(output, volume)
    expected_output = model.predict(case["array"], geometry=mrml.geometry_from_volume_node(volume))
    np.testing.assert_allclose(slicer.util.arrayFromVolume(output), expected_output, rtol=1e-5, atol=1e-4)

    params = dict(n_blocks=30, n_jitters=2, blocks="grid")
    node = mrml.run_backward(model, [volume], case["segmentation"], case["out_id"], output_node=output, **params)
    assert node.GetName() == "T1 backward map (Output region)"
    assert_same_geometry(node, volume)
    expected = ibx.backward_mapping(model, case["array"], case["out_mask"],
                                    geometry=mrml.geometry_from_volume_node(volume), **params)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(node), expected.map, rtol=1e-5, atol=1e-6)
    assert int(node.GetAttribute("IBIX.evaluations")) == expected.evaluations


def test_multichannel_inputs_in_card_order(case):
    model = ibx.load_model(identity_model(case["tmp"], channels=("water", "fat")), device="cpu")
    volume = case["volume"]
    fat_array = case["array"][::-1].copy()
    fat = slicer.util.addVolumeFromArray(fat_array, ijk_to_ras(), name="fat")
    node = mrml.generate_output(model, [volume, fat])
    np.testing.assert_allclose(slicer.util.arrayFromVolume(node), case["array"] + fat_array, rtol=1e-5, atol=1e-3)
    with pytest.raises(ibx.InputError, match="2 input channel"):
        mrml.generate_output(model, [volume])


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

    # The run says it resampled (node attribute and the job's status line).
    model = ibx.load_model(identity_model(case["tmp"]), device="cpu")
    job = mrml.prepare_forward(model, [volume], other, ball_id, n_jitters=2)
    job.compute()
    node = job.finish()
    assert node.GetAttribute("IBIX.maskResampled") == "true"
    assert "resampled" in job.status


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
# (4) inputs unchanged after a run, a failed run and a cancelled run
# ------------------------------------------------------------------------------------------------------------------

def _snapshot(case):
    seg = case["segmentation"]
    return dict(
        nodes=case["app"].node_count(),
        ids=sorted(case["app"].scene.GetNthNode(i).GetID() for i in range(case["app"].node_count())),
        array=slicer.util.arrayFromVolume(case["volume"]).copy(),
        matrix=matrix_of(case["volume"]),
        masks={sid: mrml.mask_from_segment(seg, sid, case["volume"])[0]
               for sid in (case["seg_id"], case["out_id"])},
        segments=seg.GetSegmentation().GetNumberOfSegments(),
    )


def _assert_unchanged(case, before, allow_new=0):
    after = _snapshot(case)
    assert after["nodes"] - before["nodes"] in ((0,) if allow_new == 0 else range(1, allow_new + 1))
    if allow_new == 0:
        assert after["ids"] == before["ids"]
    np.testing.assert_array_equal(after["array"], before["array"])
    np.testing.assert_array_equal(after["matrix"], before["matrix"])
    for sid, m in before["masks"].items():
        np.testing.assert_array_equal(after["masks"][sid], m)
    assert after["segments"] == before["segments"]


def test_inputs_unchanged_after_successful_run(case):
    model = ibx.load_model(conv_model(case["tmp"]), device="cpu")
    before = _snapshot(case)
    node = mrml.run_forward(model, [case["volume"]], case["segmentation"], case["seg_id"], n_jitters=2,
                            show=False)
    _assert_unchanged(case, before, allow_new=2)  # the map and its display node only
    assert case["app"].scene.GetNodeByID(node.GetID()) is node


@pytest.mark.parametrize("mutate, message", [
    ("empty", "is empty"),
    ("no_segment", "no segment selected"),
    ("no_segmentation", "no segmentation selected"),
    ("no_volume", "no input volume selected"),
    ("transform", "harden the transform"),
    ("no_model", "no model loaded"),
])
def test_failed_runs_leave_scene_unchanged(case, mutate, message):
    model = ibx.load_model(conv_model(case["tmp"]), device="cpu")
    volume, seg, sid = case["volume"], case["segmentation"], case["seg_id"]
    if mutate == "transform":
        transform = case["app"].scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "t")
        volume.SetAndObserveTransformNodeID(transform.GetID())
    before = _snapshot(case) if mutate != "transform" else None
    args = dict(model=model, input_nodes=[volume], segmentation_node=seg, segment_id=sid)
    if mutate == "empty":
        args["segment_id"] = case["empty_id"]
    elif mutate == "no_segment":
        args["segment_id"] = ""
    elif mutate == "no_segmentation":
        args["segmentation_node"] = None
    elif mutate == "no_volume":
        args["input_nodes"] = [None]
    elif mutate == "no_model":
        args["model"] = None
    count = case["app"].node_count()
    with pytest.raises(ibx.IBIXError, match=message):
        mrml.run_forward(**args, n_jitters=2)
    assert case["app"].node_count() == count
    if before is not None:
        _assert_unchanged(case, before)


def test_cancelled_run_leaves_scene_unchanged(case):
    model = ibx.load_model(conv_model(case["tmp"]), device="cpu")
    before = _snapshot(case)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(ibx.Cancelled):
        mrml.run_forward(model, [case["volume"]], case["segmentation"], case["seg_id"], n_jitters=2, cancel=cancel)
    _assert_unchanged(case, before)

    # Cancelled part-way: the engine polls cancel between evaluations; it says yes from the second poll on.
    polls = []

    def cancel_after_first_poll():
        polls.append(1)
        return len(polls) > 1

    with pytest.raises(ibx.Cancelled):
        mrml.run_backward(model, [case["volume"]], case["segmentation"], case["out_id"], n_blocks=20,
                          n_jitters=2, blocks="grid", cancel=cancel_after_first_poll)
    assert len(polls) > 1
    _assert_unchanged(case, before)


def test_job_compute_runs_in_a_worker_thread(case):
    """The GUI's pattern: prepare (main) -> compute (thread) -> finish (main)."""
    model = ibx.load_model(conv_model(case["tmp"]), device="cpu")
    job = mrml.prepare_forward(model, [case["volume"]], case["segmentation"], case["seg_id"], n_jitters=2)
    count = case["app"].node_count()
    errors = []
    worker = threading.Thread(target=lambda: errors.append(None) if job.compute() is not None else None)
    worker.start()
    worker.join(60)
    assert case["app"].node_count() == count  # nothing added while computing
    node = job.finish()
    assert node.GetAttribute("IBIX.evaluations") == str(job.result.evaluations)
    assert "evaluations" in job.status


def test_progressive_preview_node_is_replaced_by_the_final_map(case):
    """A progressive run shows a preview node while it computes; the final map (or a cancel) removes it."""
    model = ibx.load_model(conv_model(case["tmp"]), device="cpu")
    before = _snapshot(case)
    job = mrml.prepare_forward(model, [case["volume"]], case["segmentation"], case["seg_id"], n_jitters=4,
                               progressive=True)
    job.compute()
    preview = job.show_preview()
    assert "preview, N = 2" in preview.GetName()
    np.testing.assert_allclose(mrml.slicer.util.arrayFromVolume(preview), job.preview[0])
    assert job.show_preview() is None  # nothing new to show: no second node
    job.remove_preview()
    _assert_unchanged(case, before)  # e.g. a cancel: no trace of the preview
    node = job.finish(show=False)
    assert node.GetAttribute("IBIX.parameters").count('"progressive": true') == 1


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
