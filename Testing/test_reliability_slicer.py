"""Runs in Slicer through the module's runner and the real ``ibix`` command line (slicer-core scene): the results
equal the engine's, and land on the right voxels on oblique, left-handed, anisotropic grids and with masks drawn
on another grid."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from conftest_slicer import conv_model, identity_model, import_slicer_core, slicer_app  # noqa: F401

slicer = import_slicer_core()
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import IBIXLogic as ibx  # noqa: E402
from IBIXLib import jobs  # noqa: E402
from IBIXLib import scene as mrml  # noqa: E402

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


def _run(kind, model, volumes, segmentation=None, segment_id=None, output=None, **params):
    """A run through the module's runner: inputs to files, the real ``ibix`` in a child process, result node."""
    request = mrml.prepare_request(kind, ["T1"] * len(volumes), volumes, segmentation, segment_id,
                                   output_node=output, **params)
    run = jobs.Run(request, str(model), "cpu", python=sys.executable).start()
    jobs.wait(run)
    assert run.state == jobs.FINISHED, run.error
    return run


# -- the runner gives what the engine gives -------------------------------------------------------------------

def test_forward_backward_and_output_through_the_runner_equal_the_engine(scene_case):
    model_path = conv_model(scene_case["tmp"])
    model = ibx.load_model(model_path, device="cpu")
    volume, array = scene_case["volume"], scene_case["array"]
    geometry = mrml.geometry_from_volume_node(volume)
    mask = np.zeros(SHAPE, bool)
    mask[2, 9, 6] = True
    args = (model_path, [volume], scene_case["segmentation"], scene_case["seg_id"])
    run = _run("forward", *args, n_jitters=3)
    expected = ibx.forward_mapping(model, array, mask, n_jitters=3, geometry=geometry)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(run.node), expected.normalized, rtol=1e-5, atol=1e-6)
    assert run.node.GetName() == "oblique forward map (voxel)"
    assert int(run.node.GetAttribute("IBIX.evaluations")) == expected.evaluations
    signed = _run("forward", *args, n_jitters=3, display="signed")
    np.testing.assert_allclose(slicer.util.arrayFromVolume(signed.node), expected.signed, rtol=1e-5, atol=1e-6)
    output = _run("output", model_path, [volume])
    np.testing.assert_allclose(slicer.util.arrayFromVolume(output.node), model.predict(array, geometry=geometry),
                               rtol=1e-5, atol=1e-4)
    params = dict(n_blocks=12, n_jitters=2, blocks="grid")
    backward = _run("backward", *args, output=output.node, **params)
    expected = ibx.backward_mapping(model, array, mask, geometry=geometry, **params)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(backward.node), expected.map, rtol=1e-5, atol=1e-6)
    for node in (run.node, signed.node, output.node, backward.node):
        assert mrml.geometry_from_volume_node(node).matches(geometry)


def test_a_bad_parameter_is_the_engine_message(scene_case):
    request = mrml.prepare_request("forward", ["T1"], [scene_case["volume"]], scene_case["segmentation"],
                                   scene_case["seg_id"], n_jitters=0)
    run = jobs.Run(request, str(conv_model(scene_case["tmp"])), "cpu", python=sys.executable).start()
    jobs.wait(run)
    assert run.state == jobs.FAILED and "n-jitters" in run.error.replace("_", "-")


# -- geometry traps: results land on the right voxels -----------------------------------------------------------

def test_identity_on_left_handed_oblique_anisotropic_volume_peaks_at_the_painted_point(scene_case):
    node = _run("forward", identity_model(scene_case["tmp"]), [scene_case["volume"]], scene_case["segmentation"],
                scene_case["seg_id"], n_jitters=2).node
    # By hand: RAS = origin + D diag(spacing) (i, j, k) with (i, j, k) = (6, 9, 2)
    expected = ORIGIN + LEFT_HANDED @ (SPACING * np.array([6, 9, 2]))
    np.testing.assert_allclose(_peak_ras(node), expected, atol=1e-4)
    assert np.count_nonzero(slicer.util.arrayFromVolume(node)) == 1


def test_shift_model_moves_the_peak_by_one_column_in_physical_space(scene_case):
    node = _run("forward", conv_model(scene_case["tmp"], kernel=SHIFT), [scene_case["volume"]],
                scene_case["segmentation"], scene_case["seg_id"], n_jitters=2).node
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
    run = _run("forward", identity_model(scene_case["tmp"]), [scene_case["volume"]], segmentation, seg_id,
               n_jitters=2)
    assert "resampled" in run.status
    node = run.node
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
    node = _run("forward", conv_model(tmp_path, kernel=SHIFT), [volume], segmentation, seg_id, n_jitters=2).node
    result = slicer.util.arrayFromVolume(node)
    # Samples are axial slices (k, j) at fixed i; the sample's last axis is j: the peak moves to j = 3, same i.
    assert np.count_nonzero(result) == 1
    assert np.unravel_index(np.argmax(result), shape) == (6, 3, 3)
    expected = origin + direction @ (spacing * np.array([3, 3, 6]))
    np.testing.assert_allclose(_peak_ras(node), expected, atol=1e-4)


def test_a_standby_engine_process_serves_runs_one_after_the_other_with_the_maps_of_a_new_process(slicer_app,
                                                                                               tmp_path):
    """The module keeps one engine process for its runs: each run's map is bit for bit the map of a new process
    (forward and backward, the same model and another), although the process keeps what it measured (a second
    forward map takes the cached response radius and skips the probes); one that is not needed ends when stopped."""
    import onnx_models

    from conftest_slicer import card

    autoencoder_card = card("autoencoder (test)")
    autoencoder_card["input"]["multiple_of"] = 2
    autoencoder = onnx_models.save(onnx_models.small_autoencoder(), tmp_path, "cae", autoencoder_card)
    convolution = conv_model(tmp_path)
    shape = (3, 128, 112)  # slices large enough for the probes to pay for themselves
    array = np.random.default_rng(4).uniform(1, 2, shape).astype(np.float32)
    volume = slicer.util.addVolumeFromArray(array, _ijk_to_ras(LEFT_HANDED, SPACING, ORIGIN), name="T1")
    segmentation = slicer_app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "masks")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segments = {}
    for name, box in (("A", np.s_[:, 30:34, 30:34]), ("B", np.s_[:, 70:74, 60:66]), ("out", np.s_[1, 20:26, 40:46])):
        mask = np.zeros(shape, np.uint8)
        mask[box] = 1
        segments[name] = segmentation.GetSegmentation().AddEmptySegment("", name)
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segments[name], volume)

    def request(kind, segment, **params):
        return mrml.prepare_request(kind, ["T1"], [volume], segmentation, segments[segment],
                                    display="signed" if kind == "forward" else "normalized", **params)

    def run(model, kind, segment, standby=None, **params):
        started = jobs.Run(request(kind, segment, **params), str(model), "cpu", python=sys.executable).start(standby)
        assert jobs.wait(started) == jobs.FINISHED, started.error
        assert not os.path.exists(started.folder)
        return started, slicer.util.arrayFromVolume(started.node).copy()

    standby = jobs.Standby("cpu", python=sys.executable)
    pid = standby.process._proc.pid
    jobs_in_order = [(autoencoder, "forward", "A", dict(n_jitters=4)), (autoencoder, "forward", "B", dict(n_jitters=4)),
                     (autoencoder, "backward", "out", dict(n_blocks=40, n_jitters=2)),
                     (convolution, "forward", "B", dict(n_jitters=4)), (autoencoder, "forward", "B", dict(n_jitters=4))]
    served = []
    for model, kind, segment, params in jobs_in_order:
        served.append(run(model, kind, segment, standby, **params))
        assert served[-1][0].standby is standby and standby.take() is standby
    assert standby.process._proc.pid == pid and standby.jobs == 5
    fresh = {}
    for i in (1, 2, 3):  # the same jobs, each in a new process
        model, kind, segment, params = jobs_in_order[i]
        fresh[i], expected = run(model, kind, segment, **params)
        assert fresh[i].standby is None
        np.testing.assert_array_equal(served[i][1], expected)  # bit for bit
    np.testing.assert_array_equal(served[4][1], served[1][1])  # after another model: the same map again
    first, second, new = (run.summary["forward"] for run in (served[0][0], served[1][0], fresh[1]))
    assert first["path"]["radius_source"] == new["path"]["radius_source"] == "measured"
    assert second["path"]["radius_source"] == "cached" and second["response_radius"]["evaluations"] == 0
    assert second["evaluations"] == new["evaluations"] - new["response_radius"]["evaluations"] < new["evaluations"]
    assert second["response_radius"]["radius"] == new["response_radius"]["radius"]
    backward = [run.summary["backward"]["path"]["radius_source"] for run in (served[2][0], fresh[2])]
    assert backward == ["cached", "measured"]  # the forward maps' radius: the same blocks, the same B
    assert served[0][0].summary["timings"]["start_up"] == 0.0  # the process was up before the job
    standby.stop()
    jobs.wait(standby.process)
    assert standby.process.state == jobs.CANCELLED and not os.path.exists(standby.folder)
