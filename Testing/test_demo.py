"""``ibix demo``: the shipped demos end to end (demo.py)."""
import json

from IBIXLogic.cli import main


def test_demo_quick(tmp_path, capsys):
    code = main(["demo", "--quick", "--output", str(tmp_path / "demo")])
    assert code == 0, capsys.readouterr().err
    for demo, blocks in (("t1_to_t2", 100), ("mri_to_pct", 100), ("mri_to_pct_3d", 12)):
        folder = tmp_path / "demo" / demo
        for name in ("output.nrrd", "forward_signed.nrrd", "forward_normalized.nrrd", "forward.png",
                     "backward.nrrd", "backward_blocks.nrrd", "backward.png", "summary.json"):
            assert (folder / name).is_file(), f"{demo}/{name} missing"
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["quick"] and summary["backward"]["parameters"]["n_blocks"] == blocks
        assert summary["forward"]["evaluations"] > 0 and summary["backward"]["evaluations"] > 0
    windows = summary["forward"]["parameters"]["windows"]  # the 3D patch model: only touched windows run again
    assert windows["window_evaluations"] < windows["brute_force_window_evaluations"]
    out = capsys.readouterr().out
    assert "t1_to_t2" in out and "mri_to_pct_3d" in out and "evaluations" in out
