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
