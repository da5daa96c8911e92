"""Locality helpers: radius from responses, tile alignments, probe placement (locality.py)."""
import numpy as np

from IBIXLogic import locality


def test_radius_from_responses_exact_and_with_tolerance():
    response = np.zeros((1, 31, 31))
    response[0, 15, 15] = 1.0
    response[0, 15, 18] = 0.5  # 3 voxels away
    response[0, 5, 15] = 1e-3  # 10 voxels away: a faint far tail
    points = np.array([[15, 15]])
    assert locality.radius_from_responses(response, points) == (10, False)
    assert locality.radius_from_responses(response, points, tolerance=0.01) == (3, False)
    assert locality.radius_from_responses(np.ones((1, 9, 9)), np.array([[4, 4]])) == (4, True)


def test_tile_alignments_are_doublings_that_divide_the_sample():
    assert locality.tile_alignments((64, 72), 1) == [1, 2, 4, 8]
    assert locality.tile_alignments((240, 200), 8) == [8]
    assert locality.tile_alignments((128, 128, 128), 2) == [2, 4, 8, 16, 32]


def test_probes_meet_every_phase_modulo_8_along_every_axis():
    points = locality.probe_points((100, 90, 80), 8)
    for axis in range(3):
        assert sorted(points[:, axis] % 8) == list(range(8))
    assert len({tuple(p) for p in locality.probe_points((100, 90), 5)}) == 5


def test_disjoint_groups_are_far_apart_and_as_few_as_a_lattice_allows():
    """6x6 blocks of 10x10 voxels, radius 6: blocks up to two apart conflict (their voxels are 11 apart, within
    2 * 6), so a 3x3 period of colours is optimal: 9 groups."""
    labels = np.kron(np.arange(1, 37).reshape(6, 6), np.ones((10, 10), int))
    groups = locality.disjoint_groups(labels, np.arange(1, 37), 6)
    assert sorted(np.concatenate(groups).tolist()) == list(range(1, 37))
    low, high = locality.block_boxes(labels, np.arange(1, 37))
    for group in groups:
        i = group - 1
        gap = np.maximum(0, np.maximum(low[i][None] - high[i][:, None], low[i][:, None] - high[i][None])).max(axis=2)
        assert np.all(gap[~np.eye(len(i), dtype=bool)] > 12)
    assert len(groups) == 9


def test_disjoint_groups_on_the_demo_slice_need_fewer_groups_than_colouring_by_degree():
    """The demo slice's 457 SLIC blocks at the demo model's radius (22): 39 groups (colouring by degree: 45)."""
    from pathlib import Path
    import IBIXLogic as ibx
    t1, _ = ibx.read_volume(Path(__file__).resolve().parents[1] / "Resources" / "SampleData" / "IBIX-T1.nrrd")
    blocks = ibx.superpixel_blocks(t1[93].astype(np.float32), 500)
    groups = locality.disjoint_groups(blocks, np.arange(1, blocks.max() + 1), 22)
    assert sum(len(g) for g in groups) == blocks.max() and len(groups) <= 40
