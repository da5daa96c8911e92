"""``ibix demo``: both shipped demos end to end (demo.py)."""
import json

from IBIXLogic.cli import main


def test_demo_quick(tmp_path, capsys):
    code = main(["demo", "--quick", "--output", str(tmp_path / "demo")])
    assert code == 0, capsys.readouterr().err
    for demo in ("t1_to_t2", "mri_to_pct"):
        folder = tmp_path / "demo" / demo
        for name in ("output.nrrd", "forward_signed.nrrd", "forward_normalized.nrrd", "forward.png",
                     "backward.nrrd", "backward_blocks.nrrd", "backward.png", "summary.json"):
            assert (folder / name).is_file(), f"{demo}/{name} missing"
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["quick"] and summary["backward"]["parameters"]["n_blocks"] == 100
        assert summary["forward"]["evaluations"] > 0 and summary["backward"]["evaluations"] > 0
    out = capsys.readouterr().out
    assert "t1_to_t2" in out and "mri_to_pct" in out and "evaluations" in out
