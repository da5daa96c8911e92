"""The ``ibix`` command line and its shared layer (cli.py, session.py): files and geometry, equality with the
engine, exit codes and messages, JSON-lines progress."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import IBIXLogic as ibx
import onnx_models as om
from onnx_models import KERNEL
from IBIXLogic.cli import main

# an oblique-free but non-identity geometry: flipped axes, anisotropic spacing, offset origin
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
ORIGIN = (12.5, -30.0, 7.0)
SPACING = (0.9, 1.1, 2.5)
SHAPE = (4, 20, 24)  # slices, rows, cols


def write(path, array, origin=ORIGIN, spacing=SPACING, direction=DIRECTION):
    image = sitk.GetImageFromArray(np.asarray(array))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return Path(path)


@pytest.fixture
def case(tmp_path, rng):
    """A convolution model, a 3-slice volume with a head-like blob, and input/output masks."""
    model = om.save(om.convolution(KERNEL), tmp_path, "conv", {"spatial_dims": 2, "slice_axis": "axial"})
    zz, yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    x = (100.0 * (((yy - 10) / 8.0) ** 2 + ((xx - 12) / 9.0) ** 2 < 1) + rng.normal(0, 5, SHAPE)).astype(np.float32)
    volume = write(tmp_path / "t1.nrrd", x)
    mask = np.zeros(SHAPE, np.uint8)
    mask[1:3, 8:12, 9:14] = 1
    mask[2, 14:16, 5:7] = 2
    out_mask = np.zeros(SHAPE, np.uint8)
    out_mask[2, 9:11, 10:13] = 1
    return {"model": model, "x": x, "volume": volume, "mask": mask, "mask_path": write(tmp_path / "mask.nrrd", mask),
            "out_mask": out_mask, "out_mask_path": write(tmp_path / "out_mask.nii.gz", out_mask),
            "out": tmp_path / "results", "tmp": tmp_path}


def geometry_of(path):
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection(), reader.GetSize()


def assert_input_geometry(path):
    origin, spacing, direction, size = geometry_of(path)
    np.testing.assert_allclose(origin, ORIGIN, atol=1e-5)
    np.testing.assert_allclose(spacing, SPACING, atol=1e-6)
    np.testing.assert_allclose(direction, DIRECTION, atol=1e-6)
    assert tuple(size) == tuple(reversed(SHAPE))


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def engine_model(case):
    return ibx.load_model(case["model"], device="cpu")


def geometry():
    return ibx.Geometry(ORIGIN, SPACING, np.reshape(DIRECTION, (3, 3)), SHAPE)


# -- results --------------------------------------------------------------------------------------------------
def test_predict_writes_output_with_input_geometry(case, capsys):
    code = main(["predict", "--model", str(case["model"]), "--input", str(case["volume"]),
                 "--output", str(case["out"])])
    assert code == 0
    out = case["out"] / "output.nrrd"
    assert_input_geometry(out)
    expected = engine_model(case).predict(case["x"], geometry())
    np.testing.assert_allclose(read(out), expected, atol=1e-5)
    summary = json.loads((case["out"] / "summary.json").read_text())
    assert summary["command"] == "predict" and summary["predict"]["evaluations"] == SHAPE[0]
    assert str(out) in summary["files"]
    assert "output.nrrd" in capsys.readouterr().out


def test_forward_equals_engine_and_summary(case):
    code = main(["forward", "--model", str(case["model"]), "--input", str(case["volume"]), "--mask",
                 str(case["mask_path"]), "--label", "1", "--n-jitters", "3", "--max-jitter", "7.5",
                 "--output", str(case["out"])])
    assert code == 0
    mask = case["mask"] == 1
    expected = ibx.forward_mapping(engine_model(case), case["x"], mask, n_jitters=3, max_jitter=7.5,
                                   geometry=geometry())
    for name, array in (("forward_signed.nrrd", expected.signed), ("forward_normalized.nrrd", expected.normalized)):
        assert_input_geometry(case["out"] / name)
        np.testing.assert_allclose(read(case["out"] / name), array, atol=1e-5)
    # the convolution's F is the kernel applied to the mask, slice by slice
    slices = np.stack([om.correlate(m, KERNEL) for m in mask])
    np.testing.assert_allclose(read(case["out"] / "forward_signed.nrrd"), slices, atol=1e-4)
    png = case["out"] / "forward.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((case["out"] / "summary.json").read_text())
    assert summary["command"] == "forward" and summary["label"] == 1
    forward = summary["forward"]
    assert forward["parameters"]["n_jitters"] == 3 and forward["parameters"]["max_jitter"] == 7.5
    assert forward["evaluations"] == expected.evaluations
    assert forward["device"] == "cpu" and forward["seconds"] >= 0
    assert summary["figure"]["slices"] == [1, 2]
    assert sorted(Path(f).name for f in summary["files"]) == sorted(
        ["forward_signed.nrrd", "forward_normalized.nrrd", "forward.png", "summary.json"])


def test_backward_equals_engine_nifti_and_summary(case):
    code = main(["backward", "--model", str(case["model"]), "--input", str(case["volume"]), "--out-mask",
                 str(case["out_mask_path"]), "--n-blocks", "12", "--n-jitters", "2", "--blocks", "grid",
                 "--method", "batched", "--format", "nifti", "--no-png", "--output", str(case["out"]), "-q"])
    assert code == 0
    expected = ibx.backward_mapping(engine_model(case), case["x"], case["out_mask"] > 0, n_blocks=12, n_jitters=2,
                                    blocks="grid", method="batched", geometry=geometry())
    assert_input_geometry(case["out"] / "backward.nii.gz")
    np.testing.assert_allclose(read(case["out"] / "backward.nii.gz"), expected.map, atol=1e-5)
    np.testing.assert_array_equal(read(case["out"] / "backward_blocks.nii.gz"), expected.labels)
    assert not (case["out"] / "backward.png").exists()
    summary = json.loads((case["out"] / "summary.json").read_text())
    backward = summary["backward"]
    assert backward["evaluations"] == expected.evaluations
    assert backward["evaluations_per_level"] == expected.evaluations_per_level
    assert backward["parameters"]["blocks"] == "grid" and backward["parameters"]["method"] == "batched"
    assert "response_radius" in backward and summary["seconds_total"] > 0


def test_backward_local_coarse_to_fine_with_png(case):
    code = main(["backward", "--model", str(case["model"]), "--input", str(case["volume"]), "--mask",
                 str(case["out_mask_path"]), "--n-blocks", "40", "--coarse-blocks", "6", "--n-jitters", "2",
                 "--output", str(case["out"]), "-q"])
    assert code == 0
    summary = json.loads((case["out"] / "summary.json").read_text())
    assert len(summary["backward"]["evaluations_per_level"]) == 2
    assert summary["backward"]["response_radius"]["radius"] is not None
    assert (case["out"] / "backward.png").stat().st_size > 1000


def test_multichannel_order_and_channel_selection(tmp_path, rng):
    weights = [0.5, -2.0, 3.0]
    model = om.save(om.channel_mix(weights), tmp_path, "mix", {"input": {"channels": ["water", "fat", "in_phase"]}})
    paths = [write(tmp_path / f"{c}.mha", rng.normal(size=SHAPE).astype(np.float32)) for c in ("w", "f", "i")]
    mask = np.zeros(SHAPE, np.uint8)
    mask[1, 4:8, 4:8] = 1
    mask_path = write(tmp_path / "m.nrrd", mask)
    args = ["forward", "--model", str(model), "--mask", str(mask_path), "--max-jitter", "0.5", "--n-jitters", "2",
            "--channels", "fat", "--no-png", "-q", "--output", str(tmp_path / "o")]
    for p in paths:
        args += ["--input", str(p)]
    assert main(args) == 0
    np.testing.assert_allclose(read(tmp_path / "o" / "forward_signed.nrrd"), weights[1] * mask, atol=1e-5)


def test_mask_on_another_grid_is_resampled_with_a_note(case, capsys):
    # the same physical box on a grid with half the in-plane spacing
    fine = np.repeat(np.repeat(case["mask"], 2, axis=1), 2, axis=2)
    origin = tuple(np.array(ORIGIN) + np.reshape(DIRECTION, (3, 3)) @ (-np.array(SPACING) / 4 * [1, 1, 0]))
    path = write(case["tmp"] / "fine_mask.nrrd", fine, origin=origin,
                 spacing=(SPACING[0] / 2, SPACING[1] / 2, SPACING[2]))
    code = main(["forward", "--model", str(case["model"]), "--input", str(case["volume"]), "--mask", str(path),
                 "--label", "1", "--n-jitters", "2", "--no-png", "--output", str(case["out"])])
    assert code == 0
    assert "resampled" in capsys.readouterr().err
    summary = json.loads((case["out"] / "summary.json").read_text())
    assert summary["forward"]["parameters"]["mask_voxels"] == int((case["mask"] == 1).sum())


def test_quiet_prints_nothing(case, capsys):
    code = main(["forward", "--model", str(case["model"]), "--input", str(case["volume"]), "--mask",
                 str(case["mask_path"]), "--label", "1", "--quiet", "--output", str(case["out"])])
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert (case["out"] / "forward.png").is_file()


# -- errors ---------------------------------------------------------------------------------------------------
def run_error(capsys, args):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err


def test_missing_files(case, capsys):
    code, err = run_error(capsys, ["predict", "--model", str(case["model"]), "--input",
                                   str(case["tmp"] / "nope.nrrd"), "--output", str(case["out"])])
    assert code == 2 and "nope.nrrd" in err and "no such file" in err
    code, err = run_error(capsys, ["predict", "--model", str(case["tmp"] / "nomodel.onnx"), "--input",
                                   str(case["volume"]), "--output", str(case["out"])])
    assert code == 2 and "nomodel.onnx" in err and "not found" in err
    code, err = run_error(capsys, ["forward", "--model", str(case["model"]), "--input", str(case["volume"]),
                                   "--mask", str(case["tmp"] / "nomask.nrrd"), "--output", str(case["out"])])
    assert code == 2 and "nomask.nrrd" in err


def test_unreadable_volume(case, capsys, rng):
    bad = case["tmp"] / "garbage.nrrd"
    bad.write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    code, err = run_error(capsys, ["predict", "--model", str(case["model"]), "--input", str(bad),
                                   "--output", str(case["out"])])
    assert code == 2 and "garbage.nrrd" in err and "not a readable volume" in err


def test_mask_that_does_not_overlap(case, capsys):
    far = write(case["tmp"] / "far_mask.nrrd", case["mask"], origin=(500.0, 500.0, 500.0))
    code, err = run_error(capsys, ["forward", "--model", str(case["model"]), "--input", str(case["volume"]),
                                   "--mask", str(far), "--label", "1", "--output", str(case["out"])])
    assert code == 2 and "far_mask.nrrd" in err and "does not overlap" in err


def test_mask_with_several_labels_needs_one(case, capsys):
    code, err = run_error(capsys, ["forward", "--model", str(case["model"]), "--input", str(case["volume"]),
                                   "--mask", str(case["mask_path"]), "--output", str(case["out"])])
    assert code == 2 and "mask.nrrd" in err and "2 different nonzero values (1, 2)" in err and "--label" in err
    assert not case["out"].exists()


def test_empty_label(case, capsys):
    code, err = run_error(capsys, ["forward", "--model", str(case["model"]), "--input", str(case["volume"]),
                                   "--mask", str(case["mask_path"]), "--label", "7", "--output", str(case["out"])])
    assert code == 2 and "label 7" in err


def test_unwritable_output_folder(case, capsys):
    blocker = case["tmp"] / "a_file"
    blocker.write_text("not a folder")
    folder = blocker / "results"
    code, err = run_error(capsys, ["predict", "--model", str(case["model"]), "--input", str(case["volume"]),
                                   "--output", str(folder)])
    assert code == 2 and str(folder) in err and "output folder" in err


def test_refuses_to_overwrite_an_input(case, capsys):
    victim = case["tmp"] / "output.nrrd"
    write(victim, case["x"])
    before = victim.read_bytes()
    code, err = run_error(capsys, ["predict", "--model", str(case["model"]), "--input", str(victim),
                                   "--output", str(case["tmp"])])
    assert code == 2 and "overwrite an input" in err
    assert victim.read_bytes() == before


def test_wrong_channel_count(tmp_path, capsys, rng):
    model = om.save(om.channel_mix([1.0, 1.0, 1.0]), tmp_path, "mix", {"input": {"channels": ["water", "fat", "ip"]}})
    volume = write(tmp_path / "w.nrrd", rng.normal(size=SHAPE).astype(np.float32))
    code, err = run_error(capsys, ["predict", "--model", str(model), "--input", str(volume), "--input", str(volume),
                                   "--output", str(tmp_path / "o")])
    assert code == 2 and "3 input channel(s)" in err and "2 --input" in err


def test_channels_on_different_grids(tmp_path, capsys, rng):
    model = om.save(om.channel_mix([1.0, 1.0]), tmp_path, "mix2", {"input": {"channels": ["a", "b"]}})
    a = write(tmp_path / "a.nrrd", rng.normal(size=SHAPE).astype(np.float32))
    b = write(tmp_path / "b.nrrd", rng.normal(size=SHAPE).astype(np.float32), spacing=(2.0, 2.0, 2.0))
    code, err = run_error(capsys, ["predict", "--model", str(model), "--input", str(a), "--input", str(b),
                                   "--output", str(tmp_path / "o")])
    assert code == 2 and "b.nrrd" in err and "grid" in err


@pytest.mark.parametrize("option", [["--n-jitters", "0"], ["--max-jitter", "-1"], ["--method", "fast"],
                                    ["--compactness", "abc"], ["--refine-threshold", "2"],
                                    ["--locality-tolerance", "1"]])
def test_bad_option_values(case, capsys, option):
    code, err = run_error(capsys, ["backward", "--model", str(case["model"]), "--input", str(case["volume"]),
                                   "--mask", str(case["out_mask_path"]), "--output", str(case["out"])] + option)
    assert code == 2 and option[0] in err
    assert not (case["out"] / "summary.json").exists()


def test_slice_out_of_range_and_unknown_channel(case, capsys):
    code, err = run_error(capsys, ["forward", "--model", str(case["model"]), "--input", str(case["volume"]),
                                   "--mask", str(case["mask_path"]), "--label", "1", "--slice", "9",
                                   "--output", str(case["out"])])
    assert code == 2 and "--slice 9" in err
    code, err = run_error(capsys, ["forward", "--model", str(case["model"]), "--input", str(case["volume"]),
                                   "--mask", str(case["mask_path"]), "--label", "1", "--channels", "T2",
                                   "--output", str(case["out"])])
    assert code == 2 and "T2" in err


def test_no_command_and_help(capsys):
    assert main([]) == 2
    assert main(["forward", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--n-jitters", "--max-jitter", "--channels", "--label", "--device", "--memory-budget",
                   "--format", "--slice", "--quiet"):
        assert option in text
    assert "(default: 8)" in text and "(default: auto)" in text


def test_console_script_help():
    script = Path(sys.executable).with_name("ibix")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "IBIXLogic.cli"]
    result = subprocess.run(command + ["backward", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for option in ("--n-blocks", "--compactness", "--blocks", "--block-labels", "--normalization",
                   "--coarse-blocks", "--refine-threshold", "--method", "--locality-tolerance", "--out-label"):
        assert option in result.stdout
    assert "(default: 500)" in result.stdout and "(default: 0.25)" in result.stdout


# -- demo -----------------------------------------------------------------------------------------------------


def test_progressive_writes_previews_then_the_final_map(case, capsys):
    code = main(["backward", "--model", str(case["model"]), "--input", str(case["volume"]), "--out-mask",
                 str(case["out_mask_path"]), "--n-blocks", "20", "--n-jitters", "4", "--progressive",
                 "--no-png", "--output", str(case["out"])])
    assert code == 0
    notes = capsys.readouterr().err
    assert "preview with N = 1 written to" in notes and "preview with N = 2 written to" in notes
    assert not (case["out"] / ".backward_preview.nrrd").exists()  # replaced by the final map
    assert sorted(p.name for p in case["out"].iterdir()) == ["backward.nrrd", "backward_blocks.nrrd", "summary.json"]
    summary = json.loads((case["out"] / "summary.json").read_text())
    assert summary["backward"]["parameters"]["progressive"] is True
    assert summary["backward"]["parameters"]["n_jitters_used"] == 4
    assert summary["backward"]["parameters"]["tiles"] is True


def test_no_tiles_reaches_the_engine(case):
    code = main(["backward", "--model", str(case["model"]), "--input", str(case["volume"]), "--out-mask",
                 str(case["out_mask_path"]), "--n-blocks", "20", "--n-jitters", "1", "--no-tiles", "--no-png",
                 "--quiet", "--output", str(case["out"])])
    assert code == 0
    summary = json.loads((case["out"] / "summary.json").read_text())
    assert summary["backward"]["parameters"]["tiles"] is False


# -- JSON-lines progress --------------------------------------------------------------------------------------
def run_jsonl(arguments):
    """``ibix`` in a child process with JSON-lines progress: (exit code, parsed stdout records, stderr)."""
    result = subprocess.run([sys.executable, "-m", "IBIXLogic.cli", *arguments, "--progress-format", "jsonl"],
                            capture_output=True, text=True, timeout=120)
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines()], result.stderr


@pytest.mark.parametrize("command", ["predict", "forward", "backward", "atlas"])
def test_jsonl_progress_parses_line_by_line_and_ends_with_the_finished_record(case, command):
    arguments = [command, "--model", str(case["model"]), "--input", str(case["volume"]), "--output",
                 str(case["out"])]
    if command == "forward":
        arguments += ["--mask", str(case["mask_path"]), "--label", "1"]
    if command == "backward":
        arguments += ["--out-mask", str(case["out_mask_path"]), "--n-blocks", "20", "--n-jitters", "1"]
    if command == "atlas":
        arguments += ["--n-blocks", "20", "--n-jitters", "1"]
    code, records, _ = run_jsonl(arguments)
    assert code == 0
    if command != "predict":  # a mapping's estimate comes first
        estimate, records = records[0], records[1:]
        assert estimate["stage"] == "estimate" and isinstance(estimate["seconds"], float)
        assert isinstance(estimate["advice"], list) and estimate["evaluations"] > 0
    progress, last = records[:-1], records[-1]
    assert progress and all(set(r) == {"stage", "done", "total"} and 0 <= r["done"] <= r["total"] for r in progress)
    assert last["stage"] == "finished"
    assert Path(last["summary"]).is_absolute() and json.loads(Path(last["summary"]).read_text())["command"] == command
    expected = {"predict": {"output"}, "forward": {"forward_signed", "forward_normalized", "forward_png"},
                "backward": {"backward", "backward_blocks", "backward_png"},
                "atlas": {"atlas", "atlas_blocks"}}[command] | {"summary"}
    assert set(last["files"]) == expected and all(Path(p).is_file() for p in last["files"].values())
    if command != "predict":
        assert json.loads(Path(last["summary"]).read_text())[command]["evaluations"] == estimate["evaluations"]


@pytest.mark.parametrize("command", ["forward", "backward", "atlas"])
def test_estimate_says_the_cost_and_writes_nothing(case, capsys, command):
    arguments = [command, "--model", str(case["model"]), "--input", str(case["volume"]), "--output", str(case["out"]),
                 "--estimate"]
    arguments += {"forward": ["--mask", str(case["mask_path"]), "--label", "1"],
                  "backward": ["--out-mask", str(case["out_mask_path"]), "--n-blocks", "20", "--n-jitters", "1"],
                  "atlas": ["--n-blocks", "20", "--n-jitters", "1"]}[command]
    assert main(arguments) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("estimate: ") and " model evaluations, about " in line and line.endswith(" on cpu")
    assert not case["out"].exists()
    code, records, _ = run_jsonl(arguments)
    assert code == 0 and not case["out"].exists()
    assert [r["stage"] for r in records] == ["estimate", "finished"]
    assert records[1]["files"] == {} and records[1]["summary"] is None


def test_estimate_of_an_answer_from_an_atlas_is_free(case, capsys):
    atlas_dir = case["tmp"] / "atlas"
    assert main(["atlas", "--model", str(case["model"]), "--input", str(case["volume"]), "--n-blocks", "12",
                 "--n-jitters", "1", "--output", str(atlas_dir), "-q"]) == 0
    code, records, _ = run_jsonl(["backward", "--model", str(case["model"]), "--input", str(case["volume"]),
                                  "--out-mask", str(case["out_mask_path"]), "--atlas", str(atlas_dir / "atlas.npz"),
                                  "--output", str(case["out"]), "--estimate"])
    assert code == 0 and records[0]["evaluations"] == 0 and records[0]["note"] == "answered from the response atlas"


def test_the_figure_reuses_the_outputs_the_map_computed(tmp_path, rng):
    """A 3D model in sliding windows: the forward map ran every window unperturbed once; the PNG runs nothing."""
    card = {"spatial_dims": 3, "input": {"layout": "NCDHW", "patch": {"size": [8, 12, 12], "overlap": 0.25}}}
    model = om.save(om.convolution(np.ones((3, 3, 3), np.float32) / 27, layout="NCDHW"), tmp_path, "patched", card)
    volume = write(tmp_path / "x.nrrd", rng.normal(100, 10, (12, 30, 28)).astype(np.float32))
    mask = np.zeros((12, 30, 28), np.uint8)
    mask[5:7, 10:13, 3:6] = 1
    out = tmp_path / "out"
    assert main(["forward", "--model", str(model), "--input", str(volume), "--mask",
                 str(write(tmp_path / "m.nrrd", mask)), "--n-jitters", "2", "--output", str(out), "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["figure"]["evaluations"] == 0 and (out / "forward.png").stat().st_size > 1000
    assert summary["forward"]["path"]["method"] == "whole samples"
    assert summary["forward"]["work"]["vs_brute_force"] < 1


def test_jsonl_failure_ends_with_the_failed_record_and_the_exit_code(case):
    code, records, err = run_jsonl(["forward", "--model", str(case["model"]), "--input", str(case["volume"]),
                                    "--mask", str(case["tmp"] / "missing.nrrd"), "--output", str(case["out"])])
    assert code == 2
    assert records[-1]["stage"] == "failed" and "missing.nrrd" in records[-1]["error"]
    assert "missing.nrrd" in err  # the human message stays on stderr


# -- response atlas -------------------------------------------------------------------------------------------
def test_atlas_then_backward_from_it_equals_the_engine(case, capsys):
    atlas_dir = case["tmp"] / "atlas"
    code = main(["atlas", "--model", str(case["model"]), "--input", str(case["volume"]), "--n-blocks", "12",
                 "--n-jitters", "2", "--output", str(atlas_dir)])
    assert code == 0
    assert "ibix backward --atlas" in capsys.readouterr().out
    summary = json.loads((atlas_dir / "summary.json").read_text())
    assert summary["command"] == "atlas"
    assert summary["atlas"]["blocks"] == int(read(atlas_dir / "atlas_blocks.nrrd").max())
    assert summary["atlas"]["evaluations"] > 0 and summary["atlas"]["memory_mib"] >= 0
    assert_input_geometry(atlas_dir / "atlas_blocks.nrrd")
    code = main(["backward", "--model", str(case["model"]), "--input", str(case["volume"]), "--out-mask",
                 str(case["out_mask_path"]), "--atlas", str(atlas_dir / "atlas.npz"), "--n-blocks", "12",
                 "--normalization", "magnitude", "--output", str(case["out"]), "-q"])
    assert code == 0
    labels = read(atlas_dir / "atlas_blocks.nrrd")
    expected = ibx.backward_mapping(engine_model(case), case["x"], case["out_mask"] > 0, blocks=labels, n_jitters=2,
                                    normalization="magnitude", geometry=geometry())
    np.testing.assert_allclose(read(case["out"] / "backward.nrrd"), expected.map, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(read(case["out"] / "backward_blocks.nrrd"), expected.labels)
    backward = json.loads((case["out"] / "summary.json").read_text())["backward"]
    assert backward["evaluations"] == 0 and backward["parameters"]["atlas"] is True
    assert (case["out"] / "backward.png").stat().st_size > 1000


def test_backward_refuses_options_and_inputs_that_contradict_the_atlas(case, capsys, rng):
    atlas_dir = case["tmp"] / "atlas"
    assert main(["atlas", "--model", str(case["model"]), "--input", str(case["volume"]), "--n-blocks", "12",
                 "--n-jitters", "1", "--output", str(atlas_dir), "-q"]) == 0
    common = ["backward", "--model", str(case["model"]), "--input", str(case["volume"]), "--out-mask",
              str(case["out_mask_path"]), "--atlas", str(atlas_dir / "atlas.npz"), "--output", str(case["out"])]
    code, message = run_error(capsys, common + ["--n-blocks", "30", "--coarse-blocks", "4"])
    assert code == 2 and "--n-blocks 30 (the atlas has 12)" in message and "--coarse-blocks" in message
    other = write(case["tmp"] / "other.nrrd", case["x"] + 1)
    code, message = run_error(capsys, [a if a != str(case["volume"]) else str(other) for a in common])
    assert code == 2 and "another input volume" in message
    code, message = run_error(capsys, common[:-4] + ["--atlas", str(case["tmp"] / "none.npz"), "--output",
                                                     str(case["out"])])
    assert code == 2 and "none.npz" in message and "not found" in message


def test_atlas_budget_error_names_the_budget(tmp_path, capsys, rng):
    model = om.save(om.convolution_plus_mean(KERNEL, 1e-3), tmp_path, "global")
    volume = write(tmp_path / "x.nrrd", rng.normal(size=(40, 40)).astype(np.float32), (0.0, 0.0), (1.0, 1.0),
                   (1.0, 0.0, 0.0, 1.0))
    code, message = run_error(capsys, ["atlas", "--model", str(model), "--input", str(volume), "--n-blocks",
                                       "100", "--atlas-budget", "0.5", "--output", str(tmp_path / "out")])
    assert code == 2 and "memory budget of 0.5 MiB" in message
    assert "global" in message and "--atlas-budget" in message


# -- reliability ---------------------------------------------------------------------------------------------------
def test_a_2d_mask_for_a_3d_input_names_the_mask_and_both_shapes(case, capsys):
    flat = write(case["tmp"] / "flat_mask.nrrd", case["mask"][1], origin=ORIGIN[:2], spacing=SPACING[:2],
                 direction=(-1.0, 0.0, 0.0, -1.0))
    code, err = run_error(capsys, ["forward", "--model", str(case["model"]), "--input", str(case["volume"]),
                                   "--mask", str(flat), "--label", "1", "--output", str(case["out"])])
    assert code == 2, err
    assert "flat_mask.nrrd" in err and "mask is 2D (shape (20, 24))" in err and "volume is 3D (shape (4, 20, 24))" in err
    assert "IBIX_DEBUG" not in err and "resampled" not in err and not case["out"].exists()


def test_a_max_jitter_too_small_exits_2_with_the_smallest_usable_value(case, capsys):
    code, err = run_error(capsys, ["forward", "--model", str(case["model"]), "--input", str(case["volume"]),
                                   "--mask", str(case["mask_path"]), "--label", "1", "--max-jitter", "1e-40",
                                   "--output", str(case["out"])])
    assert code == 2 and "too small for this input" in err and "use max_jitter >= " in err
    assert not case["out"].exists() or not any(case["out"].iterdir())


def test_block_labels_of_2_to_the_31_or_more_keep_their_blocks(case):
    labels = np.zeros(SHAPE, np.int64)
    labels[:, :10] = 1
    labels[:, 10:] = 2
    for name, offset in (("small", 0), ("large", 2**31 - 1)):
        path = write(case["tmp"] / f"blocks_{name}.nrrd", np.where(labels > 0, labels + offset, 0))
        assert main(["backward", "--model", str(case["model"]), "--input", str(case["volume"]), "--out-mask",
                     str(case["out_mask_path"]), "--block-labels", str(path), "--n-jitters", "1", "--no-png",
                     "--quiet", "--output", str(case["out"] / name)]) == 0
    small, large = (read(case["out"] / name / "backward.nrrd") for name in ("small", "large"))
    np.testing.assert_array_equal(large, small)
    assert small.max() > 0


def test_a_batch_mixing_model_is_run_one_sample_per_call_and_the_summary_says_so(case, capsys):
    model = om.save(om.batch_mixing("ReduceMean", 1.0), case["tmp"], "mixing")
    code = main(["forward", "--model", str(model), "--input", str(case["volume"]), "--mask",
                 str(case["mask_path"]), "--label", "1", "--n-jitters", "2", "--no-png", "--output", str(case["out"])])
    assert code == 0
    assert "mixes the samples of a batch" in capsys.readouterr().err
    summary = json.loads((case["out"] / "summary.json").read_text())
    assert any("one sample per model call" in a for a in summary["model"]["card"]["assumptions"])
    assert any("one sample per model call" in a for a in summary["forward"]["parameters"]["model_assumptions"])
    signed = read(case["out"] / "forward_signed.nrrd")
    np.testing.assert_allclose(signed, 2.0 * (case["mask"] == 1), atol=1e-4)  # alone, y = x + mean(x) = 2x


class _InterruptingImport:
    """A meta path finder that interrupts the import of one module (as Ctrl-C while Python loads IBIX)."""

    def __init__(self, name, exception):
        self.name, self.exception = name, exception

    def find_spec(self, name, path=None, target=None):
        if name == self.name:
            raise self.exception
        return None


@pytest.mark.parametrize("interrupt", ["KeyboardInterrupt", "ImportError after SIGINT"])
def test_an_interrupt_while_the_command_line_loads_exits_130_without_traceback(monkeypatch, capsys, interrupt):
    import ibix_launcher

    monkeypatch.delitem(sys.modules, "IBIXLogic.cli")
    if interrupt == "KeyboardInterrupt":
        finder = _InterruptingImport("IBIXLogic.cli", KeyboardInterrupt())
    else:  # numpy's extension modules turn an interrupt during their import into an ImportError
        monkeypatch.setattr(ibix_launcher, "_interrupts", [2])
        finder = _InterruptingImport("IBIXLogic.cli", ImportError("PyCapsule_Import could not import module"))
    monkeypatch.setattr(sys, "meta_path", [finder] + sys.meta_path)
    assert ibix_launcher.main() == 130
    assert capsys.readouterr().err == "ibix: interrupted; nothing was written\n"


def test_an_import_error_without_an_interrupt_is_not_hidden(monkeypatch):
    import ibix_launcher

    monkeypatch.delitem(sys.modules, "IBIXLogic.cli")
    monkeypatch.setattr(ibix_launcher, "_interrupts", [])
    monkeypatch.setattr(sys, "meta_path", [_InterruptingImport("IBIXLogic.cli", ImportError("broken"))] + sys.meta_path)
    with pytest.raises(ImportError, match="broken"):
        ibix_launcher.main()


def test_ctrl_c_early_in_the_console_script_exits_130_quietly(case):
    script = Path(sys.executable).with_name("ibix")
    if not script.exists():
        pytest.skip("the ibix console script is not installed")
    import signal
    import time

    process = subprocess.Popen([str(script), "forward", "--model", str(case["model"]), "--input",
                                str(case["volume"]), "--mask", str(case["mask_path"]), "--label", "1",
                                "--output", str(case["out"])], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    maps = Path(f"/proc/{process.pid}/maps")

    def loading_numpy() -> bool:
        try:
            return "numpy" in maps.read_text()
        except OSError:  # the process is gone
            return True

    if maps.exists():  # Linux: wait until numpy is being loaded, i.e. the launcher runs (not Python's own start)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not loading_numpy():
            time.sleep(0.005)
    else:
        time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err


def test_the_figure_output_reuses_the_mapping_s_preparation_and_equals_the_model_s(tmp_path, rng):
    """Slices a forward map did not evaluate whole are predicted with the intensity mapping the map used
    (percentiles not computed again): the same output as the model's prediction."""
    from IBIXLogic import session
    card = {"spatial_dims": 2, "slice_axis": "sagittal", "in_plane": {"transpose": True},
            "input": {"intensity": {"percentiles": [1, 99], "to": [0, 1]}}}
    model = ibx.load_model(om.save(om.convolution(KERNEL), tmp_path, "conv", card))
    x = rng.normal(100, 10, (20, 18, 6)).astype(np.float32)
    inputs = session.Inputs([x], ibx.Geometry.identity(x.shape), [tmp_path / "x.nrrd"])
    mask = np.zeros(x.shape, bool)
    mask[5:8, 4:7, 2] = True
    result = ibx.forward_mapping(model, x, mask, n_jitters=1, method="whole", geometry=inputs.geometry)
    axis = session.figure_axis(model, inputs.geometry, 3)
    assert axis == 2 and sorted(result.outputs) == [2]
    output, evaluations = session.output_on_slices(model, inputs, axis, [1, 2, 4], result.outputs, result.preparation)
    assert evaluations == 2  # slice 2 came with the map
    expected = model.predict(x, geometry=inputs.geometry)
    for s in (1, 2, 4):
        np.testing.assert_allclose(output[:, :, s], expected[:, :, s], rtol=1e-6, atol=1e-5)
    assert not output[:, :, [0, 3, 5]].any()


def test_the_figure_of_a_local_3d_map_runs_a_slab_of_slices_not_the_volume(tmp_path, rng):
    from IBIXLogic import session
    model = ibx.load_model(om.save(om.small_autoencoder_3d(), tmp_path, "ae3d",
                                   {"spatial_dims": 3, "input": {"layout": "NCDHW", "multiple_of": 2}}))
    x = rng.normal(size=(96, 64, 72)).astype(np.float32)
    inputs = session.Inputs([x], ibx.Geometry.identity(x.shape), [tmp_path / "x.nrrd"])
    mask = np.zeros(x.shape, bool)
    mask[50:53, 30:33, 30:33] = True
    result = ibx.forward_mapping(model, x, mask, n_jitters=1, method="local")
    assert result.tiling["tiles"] is True and not result.outputs
    reach = (result.radius["radius"], result.tiling["alignment"])
    voxels = model.evaluated_voxels
    output, evaluations = session.output_on_slices(model, inputs, 0, [50, 51, 52], result.outputs,
                                                   result.preparation, reach)
    assert evaluations == 1 and model.evaluated_voxels - voxels < 0.5 * x.size  # a slab, not the volume
    np.testing.assert_allclose(output[50:53], model.predict(x)[50:53], rtol=1e-5, atol=1e-5)
    assert not output[:50].any() and not output[53:].any()
