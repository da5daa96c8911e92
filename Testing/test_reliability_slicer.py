"""Reliability in Slicer (slicer-core scene): one run at a time, closing the scene cancels a run, and results
land on the right voxels on oblique, left-handed, anisotropic grids and with masks drawn on another grid."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest_slicer import conv_model, identity_model, import_slicer_core, slicer_app  # noqa: F401

slicer = import_slicer_core()
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import IBIXLogic as ibx  # noqa: E402
from IBIXLogic import mrml  # noqa: E402

SHIFT = np.zeros((3, 3), np.float32)
SHIFT[1, 2] = 1.0  # cross-correlation: y[r, c] = x[r, c + 1]


def _ijk_to_ras(direction, spacing, origin):
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction) @ np.diag(spacing)
    m[:3, 3] = origin
    return m


# Left-handed (det -1), oblique (20 degrees about A) and anisotropic.
_C, _S = np.cos(np.radians(20)), np.sin(np.radians(20))
LEFT_HANDED = np.array([[_C, 0.0, _S], [0.0, -1.0, 0.0], [-_S, 0.0, _C]])  # columns i, j, k in RAS
SPACING = np.array([0.8, 1.3, 3.0])
ORIGIN = np.array([-20.0, 15.0, 7.5])
SHAPE = (4, 18, 14)


@pytest.fixture
def scene_case(slicer_app, tmp_path):
    assert np.linalg.det(LEFT_HANDED) < 0
    matrix = _ijk_to_ras(LEFT_HANDED, SPACING, ORIGIN)
    array = np.random.default_rng(2).uniform(10, 20, SHAPE).astype(np.float32)
    volume = slicer.util.addVolumeFromArray(array, matrix, name="oblique")
    segmentation = slicer_app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "masks")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    mask = np.zeros(SHAPE, np.uint8)
    mask[2, 9, 6] = 1  # one voxel: (k, j, i) = (2, 9, 6)
    seg_id = segmentation.GetSegmentation().AddEmptySegment("", "voxel")
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, seg_id, volume)
    return dict(app=slicer_app, volume=volume, segmentation=segmentation, seg_id=seg_id, matrix=matrix,
                array=array, tmp=tmp_path)


def _peak_ras(node):
    values = np.abs(slicer.util.arrayFromVolume(node))
    k, j, i = np.unravel_index(np.argmax(values), values.shape)
    return (mrml._ijk_to_ras_array(node) @ np.array([i, j, k, 1.0]))[:3]


# -- one run at a time ------------------------------------------------------------------------------------------

def test_a_second_run_while_one_computes_is_refused_never_interleaved(scene_case):
    model = ibx.load_model(conv_model(scene_case["tmp"]), device="cpu")
    args = (model, [scene_case["volume"]], scene_case["segmentation"], scene_case["seg_id"])
    first = mrml.prepare_forward(*args, n_jitters=2)
    second = mrml.prepare_forward(*args, n_jitters=2)
    inside, release = threading.Event(), threading.Event()

    def hold(*_):
        inside.set()
        release.wait(30)
        return False
    worker = threading.Thread(target=lambda: first.compute(cancel=hold))
    worker.start()
    assert inside.wait(30)
    assert mrml.run_in_progress()
    nodes = scene_case["app"].node_count()
    with pytest.raises(ibx.InputError, match="another IBIX run is in progress"):
        second.compute()
    with pytest.raises(ibx.InputError, match="another IBIX run is in progress"):  # the console API too
        mrml.run_forward(*args, n_jitters=2)
    assert scene_case["app"].node_count() == nodes and second.result is None
    release.set()
    worker.join(30)
    assert not mrml.run_in_progress()
    first_node = first.finish()
    second.compute()  # now it runs
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(second.finish()),
                                  slicer.util.arrayFromVolume(first_node))


def test_the_lock_is_released_after_a_failed_or_cancelled_run(scene_case):
    model = ibx.load_model(conv_model(scene_case["tmp"]), device="cpu")
    args = (model, [scene_case["volume"]], scene_case["segmentation"], scene_case["seg_id"])
    with pytest.raises(ibx.Cancelled):
        mrml.run_forward(*args, cancel=lambda: True)
    with pytest.raises(ibx.InputError):
        mrml.run_forward(*args, n_jitters=0)
    assert not mrml.run_in_progress()
    assert mrml.run_forward(*args, n_jitters=2) is not None


# -- closing the scene cancels ----------------------------------------------------------------------------------

@pytest.mark.parametrize("after_calls", [1, 2, 4])
def test_closing_the_scene_during_a_run_cancels_it_cleanly(scene_case, after_calls):
    app = scene_case["app"]
    model = ibx.load_model(conv_model(scene_case["tmp"]), device="cpu", memory_budget=50_000)
    args = (model, [scene_case["volume"]], scene_case["segmentation"], scene_case["seg_id"])
    calls = []

    def close_scene_on_call():
        calls.append(1)
        if len(calls) == after_calls:
            app.scene.Clear(0)  # what File > Close Scene does
        return False
    before = app.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    assert before == 1
    with pytest.raises(ibx.Cancelled, match="scene was closed"):
        mrml.run_backward(*args, n_blocks=12, blocks="grid", n_jitters=1, method="batched",
                          cancel=close_scene_on_call)
    assert app.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0  # closed, and no result added
    assert not mrml.run_in_progress()
    # The next run on a new scene works and matches a run that was never interrupted.
    volume = slicer.util.addVolumeFromArray(scene_case["array"], scene_case["matrix"], name="again")
    segmentation = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "masks")
    mask = np.zeros(SHAPE, np.uint8)
    mask[2, 9, 6] = 1
    seg_id = segmentation.GetSegmentation().AddEmptySegment("", "voxel")
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, seg_id, volume)
    node = mrml.run_backward(model, [volume], segmentation, seg_id, n_blocks=12, blocks="grid", n_jitters=1,
                             method="batched")
    expected = ibx.backward_mapping(model, scene_case["array"], mask.astype(bool), n_blocks=12, blocks="grid",
                                    n_jitters=1, method="batched",
                                    geometry=mrml.geometry_from_volume_node(volume))
    np.testing.assert_allclose(slicer.util.arrayFromVolume(node), expected.map, atol=1e-6)


def test_a_job_prepared_before_the_scene_closed_does_not_add_nodes(scene_case):
    model = ibx.load_model(conv_model(scene_case["tmp"]), device="cpu")
    job = mrml.prepare_forward(model, [scene_case["volume"]], scene_case["segmentation"], scene_case["seg_id"],
                               n_jitters=2)
    job.watch_scene()  # what the GUI does before it starts the worker thread
    scene_case["app"].scene.Clear(0)
    with pytest.raises(ibx.Cancelled, match="scene was closed"):
        job.compute()
    with pytest.raises(ibx.Cancelled, match="scene was closed"):
        job.finish()
    assert scene_case["app"].scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0


# -- geometry traps: results land on the right voxels -----------------------------------------------------------

def test_identity_on_left_handed_oblique_anisotropic_volume_peaks_at_the_painted_point(scene_case):
    model = ibx.load_model(identity_model(scene_case["tmp"]), device="cpu")
    node = mrml.run_forward(model, [scene_case["volume"]], scene_case["segmentation"], scene_case["seg_id"],
                            n_jitters=2)
    # By hand: RAS = origin + D diag(spacing) (i, j, k) with (i, j, k) = (6, 9, 2)
    expected = ORIGIN + LEFT_HANDED @ (SPACING * np.array([6, 9, 2]))
    np.testing.assert_allclose(_peak_ras(node), expected, atol=1e-4)
    assert np.count_nonzero(slicer.util.arrayFromVolume(node)) == 1


def test_shift_model_moves_the_peak_by_one_column_in_physical_space(scene_case):
    model = ibx.load_model(conv_model(scene_case["tmp"], kernel=SHIFT), device="cpu")
    node = mrml.run_forward(model, [scene_case["volume"]], scene_case["segmentation"], scene_case["seg_id"],
                            n_jitters=2)
    # y[.., c] = x[.., c + 1]: jittering column i = 6 moves output column 5 (the axial slice axis is k here).
    expected = ORIGIN + LEFT_HANDED @ (SPACING * np.array([5, 9, 2]))
    np.testing.assert_allclose(_peak_ras(node), expected, atol=1e-4)


def test_mask_painted_on_another_grid_lands_on_the_same_physical_point(scene_case):
    """A one-voxel segment on a coarser, shifted, axis-aligned grid is taken to the reference voxel nearest it."""
    app = scene_case["app"]
    target_ras = ORIGIN + LEFT_HANDED @ (SPACING * np.array([6, 9, 2]))
    other_spacing = np.array([0.5, 0.5, 0.5])
    other_origin = target_ras - other_spacing * np.array([10, 10, 10])
    other_matrix = _ijk_to_ras(np.eye(3), other_spacing, other_origin)
    other = slicer.util.addVolumeFromArray(np.zeros((21, 21, 21), np.uint8), other_matrix, name="other grid")
    blob = np.zeros((21, 21, 21), np.uint8)
    blob[9:12, 9:12, 9:12] = 1  # 1.5 mm cube centred on the target, smaller than a reference voxel
    segmentation = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other masks")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(other)
    seg_id = segmentation.GetSegmentation().AddEmptySegment("", "blob")
    slicer.util.updateSegmentBinaryLabelmapFromArray(blob, segmentation, seg_id, other)
    mask, resampled = mrml.mask_from_segment(segmentation, seg_id, scene_case["volume"])
    assert resampled
    assert mask[2, 9, 6]
    model = ibx.load_model(identity_model(scene_case["tmp"]), device="cpu")
    node = mrml.run_forward(model, [scene_case["volume"]], segmentation, seg_id, n_jitters=2)
    np.testing.assert_allclose(_peak_ras(node), target_ras, atol=1e-4)


def test_2d_model_when_the_axial_axis_is_the_arrays_last_axis(slicer_app, tmp_path):
    """The volume's i axis runs S (so axial slices are array columns): the 2D model is applied per column."""
    direction = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # i -> S, j -> R, k -> A
    spacing = np.array([2.0, 0.7, 0.9])
    origin = np.array([3.0, -4.0, 5.0])
    shape = (12, 10, 5)  # (k, j, i); 5 axial slices along i
    volume = slicer.util.addVolumeFromArray(np.random.default_rng(0).normal(size=shape).astype(np.float32),
                                            _ijk_to_ras(direction, spacing, origin), name="sideways")
    assert ibx.slice_array_axis(mrml.geometry_from_volume_node(volume), "axial") == 2
    segmentation = slicer_app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "masks")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    mask = np.zeros(shape, np.uint8)
    mask[6, 4, 3] = 1
    seg_id = segmentation.GetSegmentation().AddEmptySegment("", "voxel")
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, seg_id, volume)
    model = ibx.load_model(conv_model(tmp_path, kernel=SHIFT), device="cpu")
    node = mrml.run_forward(model, [volume], segmentation, seg_id, n_jitters=2)
    result = slicer.util.arrayFromVolume(node)
    # Samples are axial slices (k, j) at fixed i; the sample's last axis is j: the peak moves to j = 3, same i.
    assert np.count_nonzero(result) == 1
    assert np.unravel_index(np.argmax(result), shape) == (6, 3, 3)
    expected = origin + direction @ (spacing * np.array([3, 3, 6]))
    np.testing.assert_allclose(_peak_ras(node), expected, atol=1e-4)
