"""IBIXLib.live (live backward maps from a response atlas) on a real MRML scene from slicer-core, with a stand-in
single-shot timer: the answer written into the node, one node reused, debounce, observers removed."""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest_slicer import conv_model, import_slicer_core, slicer_app  # noqa: F401

slicer = import_slicer_core()

import IBIXLogic as ibx  # noqa: E402
from IBIXLib import live  # noqa: E402

SHAPE = (1, 24, 20)


class SingleShotTimer:
    """qt.QTimer with setSingleShot: the test fires it (the event loop's part)."""

    def __init__(self):
        self.active, self.interval, self.single, self.slots, self.starts = False, 0, False, [], 0

    def setSingleShot(self, single):
        self.single = single

    def setInterval(self, ms):
        self.interval = ms

    def connect(self, signal, slot):
        self.slots.append(slot)

    def isActive(self):
        return self.active

    def start(self):
        self.active, self.starts = True, self.starts + 1

    def stop(self):
        self.active = False

    def fire(self):
        if self.active:
            self.active = not self.single
            for slot in self.slots:
                slot()


@pytest.fixture
def case(slicer_app, tmp_path):
    rng = np.random.default_rng(3)
    array = (rng.random(SHAPE) * 100).astype(np.float32)
    volume = slicer.util.addVolumeFromArray(array, np.diag([0.8, 0.9, 2.5, 1.0]), name="T1")
    model_path = conv_model(tmp_path)
    model = ibx.load_model(model_path)
    geometry = live.scene.geometry_from_volume_node(volume)
    atlas = ibx.block_response_atlas(model, array, n_blocks=30, compactness=1.0, n_jitters=2, geometry=geometry)
    path = atlas.save(tmp_path / "atlas.npz")
    segmentation = slicer_app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "output masks")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "bright spot")
    return dict(app=slicer_app, volume=volume, atlas=atlas, path=path, model_path=model_path, segmentation=segmentation,
                segment_id=segment_id)


def paint(case, *slices):
    mask = np.zeros(SHAPE, np.uint8)
    mask[slices] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, case["segmentation"], case["segment_id"], case["volume"])
    return mask.astype(bool)


def test_answer_written_into_one_node_equals_the_atlas(case):
    mask = paint(case, 0, slice(8, 12), slice(5, 9))
    timer = SingleShotTimer()
    helper = live.LiveBackward(case["path"], case["volume"], case["segmentation"], case["segment_id"], timer=timer)
    node = helper.start().node
    assert node is not None and helper.error == ""
    np.testing.assert_allclose(slicer.util.arrayFromVolume(node), case["atlas"].backward(mask).map, atol=1e-7)
    assert node.GetAttribute("IBIX.kind") == "backward"
    composite = case["app"].scene.GetNodesByClass("vtkMRMLSliceCompositeNode").GetItemAsObject(0)
    assert composite.GetForegroundVolumeID() == node.GetID()
    assert composite.GetBackgroundVolumeID() == case["volume"].GetID()
    count = case["app"].node_count()
    for slices in ((0, slice(2, 6), slice(12, 18)), (0, slice(15, 22), slice(1, 4))):
        mask = paint(case, *slices)
        timer.fire()
        assert helper.node is node
        np.testing.assert_allclose(slicer.util.arrayFromVolume(node), case["atlas"].backward(mask).map, atol=1e-7)
    assert case["app"].node_count() == count  # updated in place: no new node
    helper.stop()


def test_debounce_coalesces_modifications_into_one_update(case):
    paint(case, 0, slice(8, 12), slice(5, 9))
    timer = SingleShotTimer()
    helper = live.LiveBackward(case["path"], case["volume"], case["segmentation"], case["segment_id"], timer=timer)
    helper.start()
    assert helper.updates == 1 and timer.single and timer.interval == live.INTERVAL_MS
    for row in range(3, 9):  # painting: several modifications before the timer fires
        mask = paint(case, 0, slice(row, row + 3), slice(5, 9))
    assert timer.active and timer.starts == 1 and helper.updates == 1
    timer.fire()
    assert helper.updates == 2 and not timer.active
    np.testing.assert_allclose(slicer.util.arrayFromVolume(helper.node), case["atlas"].backward(mask).map,
                               atol=1e-7)
    timer.fire()  # nothing changed since: no update
    assert helper.updates == 2
    helper.stop()


def test_live_off_removes_observers(case):
    paint(case, 0, slice(8, 12), slice(5, 9))
    segmentation = case["segmentation"]
    timer = SingleShotTimer()
    helper = live.LiveBackward(case["path"], case["volume"], segmentation, case["segment_id"], timer=timer)
    helper.start()
    assert helper.active
    helper.stop()
    assert not helper.active and not timer.active
    before = slicer.util.arrayFromVolume(helper.node).copy()
    paint(case, 0, slice(1, 4), slice(1, 4))
    assert not timer.active
    timer.fire()
    assert helper.updates == 1
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(helper.node), before)


def test_erased_segment_gives_zero_and_scene_close_stops(case):
    paint(case, 0, slice(8, 12), slice(5, 9))
    timer = SingleShotTimer()
    helper = live.LiveBackward(case["path"], case["volume"], case["segmentation"], case["segment_id"], timer=timer)
    helper.start()
    paint(case, 0, slice(0, 0), slice(0, 0))
    timer.fire()
    assert helper.error == "" and not slicer.util.arrayFromVolume(helper.node).any()
    case["app"].scene.Clear(0)
    assert not helper.active and helper.node is None


def test_atlas_of_another_grid_is_refused(case, tmp_path):
    other = slicer.util.addVolumeFromArray(np.zeros((1, 10, 10), np.float32), name="other")
    with pytest.raises(ibx.InputError, match="another grid"):
        live.LiveBackward(case["path"], other, case["segmentation"], case["segment_id"], timer=SingleShotTimer())


def test_live_imports_no_onnxruntime():
    import subprocess
    import sys

    code = ("import sys; sys.modules['slicer'] = type(sys)('slicer'); sys.modules['vtk'] = type(sys)('vtk');"
            "import IBIXLib.live; print('onnxruntime' in sys.modules)")
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(here, "..", "IBIX"), os.path.join(here, "..")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "False", out.stderr


def test_atlas_computed_by_the_engine_process_answers_live(case, tmp_path):
    """``ibix atlas`` through the runner (the real child), then the live answer from the file it kept."""
    import sys

    from IBIXLib import jobs, scene

    request = scene.prepare_request("atlas", ["T1"], [case["volume"]], n_blocks=30, compactness=1.0, n_jitters=2)
    run = jobs.AtlasRun(request, str(case["model_path"]), output_dir=str(tmp_path / "kept"), device="cpu",
                        python=sys.executable, launcher=jobs.subprocess_launcher).start()
    assert jobs.wait(run) == jobs.FINISHED, run.error
    assert run.atlas_path == str(tmp_path / "kept" / "atlas.npz") and not os.path.exists(run.folder)
    assert "atlas done" in run.status
    mask = paint(case, 0, slice(8, 12), slice(5, 9))
    helper = live.LiveBackward(run.atlas_path, case["volume"], case["segmentation"], case["segment_id"],
                               timer=SingleShotTimer()).start()
    np.testing.assert_allclose(slicer.util.arrayFromVolume(helper.node), case["atlas"].backward(mask).map,
                               atol=1e-5)
    helper.stop()
