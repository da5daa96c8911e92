"""Oracle tests of the map statistics: box blurs of known width at known, anisotropic spacing, hand-computed values."""
import json

import numpy as np
import pytest

import IBIXLogic as ibx
import onnx_models as om
from IBIXLogic import statistics as st

# spacing (mm) along x, y, z = cols, rows, slices: anisotropic, so a statistic that mixes up the axes fails
SPACING = (0.7, 1.3, 3.0)


def test_forward_statistics_of_a_box_blur(tmp_path):
    """A 3x5 (rows x cols) box blur, slice by slice, of a 6x11-voxel box mask on 2 slices.

    Along rows the 3-wide blur spreads the 6 mask rows to 1/3 on each side (inside sum 6 - 2/3 = 16/3); along
    cols the 5-wide blur gives 2/5 and 1/5 on each side (inside sum 11 - 6/5 = 49/5). |F| is their product, so per
    slice the mass is 66: inside 16/3 * 49/5, at 0.7 mm (one col out) 16/3 * 4/5, at 1.3 mm (one row out)
    2/3 * 49/5, at 1.4 mm (two cols) 16/3 * 2/5, and further out the corners. Cumulative shares: 0.792 inside,
    0.857 within 0.7 mm, 0.956 within 1.3 mm, so reach95 = 1.3 mm (the row spacing), and the inside fraction is
    (784/15) / 66 = 784/990.
    """
    model = ibx.load_model(om.save(om.box_blur((3, 5)), tmp_path, "box"))
    geometry = ibx.Geometry((0.0, 0.0, 0.0), SPACING, np.eye(3), (4, 16, 32))
    x = np.random.default_rng(3).normal(100, 10, geometry.shape).astype(np.float32)
    mask = np.zeros(geometry.shape, bool)
    mask[1:3, 5:11, 10:21] = True
    result = ibx.forward_mapping(model, x, mask, n_jitters=2, geometry=geometry)
    stats = result.statistics
    assert result.to_dict()["statistics"] == stats
    assert stats["reach95_mm"] == pytest.approx(1.3)
    assert stats["inside_fraction"] == pytest.approx(784 / 990, rel=1e-5)
    assert stats["peak"] == pytest.approx(1.0, rel=1e-5)
    # the same F on an isotropic 1 mm grid: one row out is 1 mm, one col out 1 mm -> 0.956 within 1 mm
    isotropic = ibx.Geometry.identity(geometry.shape)
    assert st.forward_statistics(result.signed, mask, isotropic)["reach95_mm"] == pytest.approx(1.0)


def test_forward_peak_location_in_ras_on_a_rotated_grid(tmp_path):
    """A 3x3 kernel whose largest weight (2.0) sits at kernel row 0, col 2: the cross-correlation moves a unit
    impulse at (slice 1, row 6, col 6) to (1, 7, 5). With i along +y (LPS), j along -x, k along +z, origin
    (10, -20, 30) and spacing 0.7/1.3/3.0 mm, that voxel is at LPS (10 - 1.3*7, -20 + 0.7*5, 30 + 3*1) =
    (0.9, -16.5, 33.0), i.e. RAS (-0.9, 16.5, 33.0)."""
    kernel = np.full((3, 3), 0.1, np.float32)
    kernel[0, 2] = 2.0
    model = ibx.load_model(om.save(om.convolution(kernel), tmp_path, "peak"))
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    geometry = ibx.Geometry((10.0, -20.0, 30.0), SPACING, direction, (3, 12, 12))
    x = np.random.default_rng(4).normal(size=geometry.shape).astype(np.float32)
    mask = np.zeros(geometry.shape, bool)
    mask[1, 6, 6] = True
    stats = ibx.forward_mapping(model, x, mask, n_jitters=2, geometry=geometry).statistics
    assert stats["peak"] == pytest.approx(2.0, rel=1e-5)
    np.testing.assert_allclose(stats["peak_ras_mm"], [-0.9, 16.5, 33.0], atol=1e-4)
    assert stats["inside_fraction"] == pytest.approx(0.1 / 2.8, rel=1e-4)


def test_backward_statistics_of_a_box_blur(tmp_path):
    """A 1x5 box blur along cols; output mask cols 20..26 of one row; blocks of 3 cols (labels 1..8 from col 11).

    A block at cols a..a+2 spreads 1/5, 2/5, 3/5, 3/5, 3/5, 2/5, 1/5 over cols a-2..a+4 (sum 3), so B, the share
    inside the mask, is 0.2 for cols 17-19, 0.8 for 20-22, 14/15 for 23-25, 0.4 for 26-28, 0 for the others.
    Masses (B x 3 voxels): 0.6, 2.4, 2.8, 1.2 = 7.0. By distance from the mask (0.7 mm per col): 5.6 inside,
    0.6 at 0.7 mm, 0.6 at 1.4 mm, 0.2 at 2.1 mm; cumulative 0.80, 0.886, 0.971 -> reach95 = 1.4 mm. Largest masses
    first: 2.8 + 2.4 + 1.2 = 6.4 >= 6.3 = 90 % -> blocks90 = 3. The peak block (cols 23-25) has its centroid at
    (slice 1, row 4, col 24): LPS (5 + 0.7*24, 6 + 1.3*4, 7 + 3*1) = (21.8, 11.2, 10.0), RAS (-21.8, -11.2, 10.0).
    """
    model = ibx.load_model(om.save(om.box_blur((1, 5)), tmp_path, "blur"))
    geometry = ibx.Geometry((5.0, 6.0, 7.0), SPACING, np.eye(3), (3, 9, 40))
    x = np.random.default_rng(5).normal(50, 5, geometry.shape).astype(np.float32)
    out_mask = np.zeros(geometry.shape, bool)
    out_mask[1, 4, 20:27] = True
    blocks = np.zeros(geometry.shape, np.int32)
    for label in range(1, 9):
        start = 11 + 3 * (label - 1)
        blocks[1, 4, start:start + 3] = label
    result = ibx.backward_mapping(model, x, out_mask, blocks=blocks, n_jitters=2, geometry=geometry)
    np.testing.assert_allclose(result.block_values[1:], [0, 0, 0.2, 0.8, 14 / 15, 0.4, 0, 0], atol=1e-5)
    stats = result.statistics
    assert result.to_dict()["statistics"] == stats
    assert stats["reach95_mm"] == pytest.approx(1.4)
    assert stats["blocks90"] == 3
    assert stats["peak"] == pytest.approx(14 / 15, rel=1e-5)
    np.testing.assert_allclose(stats["peak_ras_mm"], [-21.8, -11.2, 10.0], atol=1e-4)


def test_distances_are_physical_on_an_oblique_grid(rng):
    """The cropped distance transform equals the brute-force smallest physical distance between voxel centres,
    on a grid rotated 20 degrees about z with anisotropic spacing."""
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    geometry = ibx.Geometry((3.0, -2.0, 1.0), SPACING, rotation, (5, 7, 9))
    mask = np.zeros(geometry.shape, bool)
    mask[2, 3:5, 4] = True
    mask[1, 1, 1] = True
    where = rng.random(geometry.shape) < 0.3
    got = st.distances_mm(mask, geometry, where)
    points = np.array([geometry.lps_mm(i) for i in np.argwhere(where)])
    targets = np.array([geometry.lps_mm(i) for i in np.argwhere(mask)])
    expected = np.linalg.norm(points[:, None] - targets[None], axis=2).min(axis=1)
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_discrete_quantiles_and_empty_maps():
    # masses 0.5, 0.3, 0.15, 0.05 at 0, 1, 2, 3 mm: 95 % is reached exactly at 2 mm (0.95 = 0.95)
    assert st.reach_mm(np.array([3.0, 0.0, 2.0, 1.0]), np.array([0.05, 0.5, 0.15, 0.3]), 0.95) == 2.0
    assert st.reach_mm(np.array([0.0, 1.0]), np.zeros(2), 0.95) is None
    assert st.fewest_holding(np.array([0.1, 0.6, 0.3]), 0.9) == 2
    assert st.fewest_holding(np.array([0.1, 0.6, 0.3]), 0.91) == 3
    geometry = ibx.Geometry.identity((4, 5))
    mask = np.zeros((4, 5), bool)
    mask[1, 1] = True
    assert st.forward_statistics(np.zeros((4, 5)), mask, geometry) == {
        "reach95_mm": None, "inside_fraction": None, "peak": 0.0, "peak_ras_mm": None}
    empty_b = st.backward_statistics(np.ones((4, 5), np.int32), np.zeros(2), mask, geometry)
    assert empty_b["blocks90"] == 0 and empty_b["reach95_mm"] is None


def test_a_2d_image_has_a_2d_ras_location():
    geometry = ibx.Geometry((1.0, 2.0), (0.5, 2.0), np.eye(2), (4, 6))
    signed = np.zeros((4, 6))
    signed[3, 5] = -4.0
    signed[0, 0] = 1.0
    mask = np.zeros((4, 6), bool)
    mask[0, 0] = True
    stats = st.forward_statistics(signed, mask, geometry)
    assert stats["peak"] == 4.0
    assert stats["peak_ras_mm"] == [-(1.0 + 0.5 * 5), -(2.0 + 2.0 * 3)]
    assert stats["inside_fraction"] == pytest.approx(0.2)
    # |F| 1 at 0 mm, 4 at sqrt(2.5^2 + 6^2) = 6.5 mm
    assert stats["reach95_mm"] == pytest.approx(6.5)
    assert st.flatten(stats)["peak_a_mm"] == -8.0


@pytest.mark.parametrize("bad", ["shape", "empty", "labels"])
def test_bad_arguments_name_the_problem(bad):
    geometry = ibx.Geometry.identity((4, 5))
    mask = np.zeros((4, 5), bool)
    mask[0, 0] = True
    with pytest.raises(ibx.InputError, match={"shape": "geometry describes", "empty": "empty",
                                              "labels": "block values"}[bad]):
        if bad == "shape":
            st.forward_statistics(np.ones((4, 6)), mask, geometry)
        elif bad == "empty":
            st.forward_statistics(np.ones((4, 5)), np.zeros((4, 5), bool), geometry)
        else:
            st.backward_statistics(np.full((4, 5), 3, np.int32), np.ones(2), mask, geometry)


def test_statistics_reach_summary_json_and_the_console_line(tmp_path, capsys):
    """The box-blur oracle of the first test, through ``ibix forward`` on files: summary.json holds the same
    statistics and the console line says them."""
    from IBIXLogic import cli

    model = om.save(om.box_blur((3, 5)), tmp_path, "box")
    geometry = ibx.Geometry((0.0, 0.0, 0.0), SPACING, np.eye(3), (4, 16, 32))
    x = np.random.default_rng(3).normal(100, 10, geometry.shape).astype(np.float32)
    mask = np.zeros(geometry.shape, np.uint8)
    mask[1:3, 5:11, 10:21] = 1
    ibx.write_volume(tmp_path / "x.nrrd", x, geometry)
    ibx.write_volume(tmp_path / "mask.nrrd", mask, geometry)
    assert cli.main(["forward", "--model", str(model), "-i", str(tmp_path / "x.nrrd"), "--mask",
                     str(tmp_path / "mask.nrrd"), "--n-jitters", "2", "--no-png", "-o", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    stats = summary["forward"]["statistics"]
    assert stats["reach95_mm"] == pytest.approx(1.3)
    assert stats["inside_fraction"] == pytest.approx(784 / 990, rel=1e-5)
    assert "reach95 1.3 mm, 79 % inside the mask" in capsys.readouterr().out


@pytest.mark.parametrize("in_plane", [{}, {"transpose": True, "flip_rows": True, "flip_cols": True},
                                      {"flip_rows": True}])
def test_forward_statistics_read_only_the_support_and_equal_those_of_the_whole_grid(tmp_path, rng, in_plane):
    """The mapping hands the statistics the box where it computed F (tiles of sagittal slices here, with the card's
    in-plane transform): the same numbers as from the whole grid."""
    from IBIXLogic import forward
    card = {"spatial_dims": 2, "slice_axis": "sagittal", "in_plane": in_plane}
    model = ibx.load_model(om.save(om.convolution(om.KERNEL), tmp_path, "conv", card))
    geometry = ibx.Geometry((0.0, 0.0, 0.0), SPACING, np.eye(3), (150, 140, 5))
    x = rng.normal(size=geometry.shape).astype(np.float32)
    mask = np.zeros(geometry.shape, bool)
    mask[30:34, 100:103, 1] = mask[120:125, 10:12, 3] = True
    supports = []
    real = forward._support
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(forward, "_support", lambda *a: supports.append(real(*a)) or supports[-1])
        result = ibx.forward_mapping(model, x, mask, n_jitters=2, max_jitter=1.0, geometry=geometry, method="local")
    assert result.tiling["tiles"] is True
    box = supports[0]
    outside = result.signed.copy()
    outside[box] = 0
    assert not outside.any() and mask[box].sum() == mask.sum()
    assert result.statistics == st.forward_statistics(result.signed, mask, geometry)


@pytest.mark.parametrize("in_plane", [{}, {"transpose": True, "flip_cols": True}])
def test_backward_statistics_read_only_the_blocks_box_and_equal_those_of_the_whole_grid(tmp_path, rng, in_plane):
    card = {"spatial_dims": 2, "slice_axis": "coronal", "in_plane": in_plane}
    model = ibx.load_model(om.save(om.convolution(om.KERNEL), tmp_path, "conv", card))
    geometry = ibx.Geometry((0.0, 0.0, 0.0), SPACING, np.eye(3), (40, 6, 36))
    x = rng.normal(size=geometry.shape).astype(np.float32)
    out_mask = np.zeros(geometry.shape, bool)
    out_mask[10:13, 2, 20:24] = out_mask[30:32, 4, 3:5] = True
    result = ibx.backward_mapping(model, x, out_mask, n_blocks=30, n_jitters=1, max_jitter=1.0, geometry=geometry)
    assert result.statistics["reach95_mm"] is not None
    assert result.statistics == st.backward_statistics(result.labels, result.block_values, out_mask, geometry)
