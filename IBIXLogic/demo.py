"""``ibix demo``: the shipped demos end to end (T1 to T2, MRI to pseudo-CT in 2D and with 3D sliding windows) on
the shipped sample data.

For each demo: load the model and the sample case, predict the output, one forward map F of the shipped input
mask and one backward map B of the shipped output mask (the engine's default exact method), with volumes, PNG
figures and a ``summary.json`` in ``<output>/<demo>/``. ``figures_dir`` also writes small palette PNGs for the
documentation (``docs/images`` in the repository: ``ibix demo --figures docs/images``).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import session
from .errors import InputError
from .session import Console, Outputs


@dataclass(frozen=True)
class DemoCase:
    """One shipped demo: model, input channels (card order), masks, the channel shown under B, and the mapping
    parameters where they differ from the common ones (``{"forward": {...}, "backward": {...}}``, full and quick)."""

    name: str
    title: str
    model: str
    inputs: tuple[str, ...]
    input_mask: str
    output_mask: str
    background_channel: int = 0
    params: dict | None = None
    quick_params: dict | None = None


DEMOS = (
    DemoCase("t1_to_t2", "MRI T1 to T2 (2D convolutional autoencoder, ICBM152 T1 sample)",
             "t1_to_t2_cae.onnx", ("IBIX-T1.nrrd",), "IBIX-T1-input-mask.nrrd", "IBIX-T1-output-mask.nrrd"),
    DemoCase("mri_to_pct", "Dixon MRI to pseudo-CT (2D U-Net, procedural pelvis phantom)",
             "mri_to_pct_unet.onnx",
             ("IBIX-Pelvis-water.nrrd", "IBIX-Pelvis-fat.nrrd", "IBIX-Pelvis-inphase.nrrd"),
             "IBIX-Pelvis-input-mask.nrrd", "IBIX-Pelvis-output-mask.nrrd", background_channel=2),
    # a 3D patch model run in sliding windows. Its response radius (23 voxels) spans the 28 slices, so no block
    # can be skipped (method "batched": no radius probing); each supervoxel re-evaluates only the windows it
    # touches. Supervoxels are coarse and each one's response fills ~47^3 voxels, so only a few per cent of it lands
    # in the 90-voxel output mask: B is shown as "magnitude" (that part, scaled to a maximum of 1)
    DemoCase("mri_to_pct_3d", "Dixon MRI to pseudo-CT (3D patch U-Net in sliding windows, procedural pelvis phantom)",
             "mri_to_pct_unet3d.onnx",
             ("IBIX-Pelvis-water.nrrd", "IBIX-Pelvis-fat.nrrd", "IBIX-Pelvis-inphase.nrrd"),
             "IBIX-Pelvis-input-mask.nrrd", "IBIX-Pelvis-output-mask.nrrd", background_channel=2,
             params={"forward": {"n_jitters": 4},
                     "backward": {"n_blocks": 40, "n_jitters": 1, "method": "batched", "normalization": "magnitude"}},
             quick_params={"forward": {"n_jitters": 2},
                           "backward": {"n_blocks": 12, "n_jitters": 1, "method": "batched",
                                        "normalization": "magnitude"}}),
)

#: Parameters of the full and the quick demo.
FULL = {"forward": {"n_jitters": 8}, "backward": {"n_blocks": 500, "n_jitters": 4}}
QUICK = {"forward": {"n_jitters": 4}, "backward": {"n_blocks": 100, "n_jitters": 2}}


def resources() -> Path:
    """The shipped ``Resources`` folder (beside the IBIXLogic package in the repository)."""
    folder = Path(__file__).resolve().parents[1] / "Resources"
    if not (folder / "Models").is_dir() or not (folder / "SampleData").is_dir():
        raise InputError(f"{folder}: the demo models and sample data (Resources/Models, Resources/SampleData) are "
                         "not there; run the demo from a checkout of the IBIX repository (pip install -e .)")
    return folder


def _writable(folder: Path) -> None:
    """Create the documentation figures' folder; refuse one that cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{folder}: cannot create the figures folder ({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK):
        raise InputError(f"{folder}: the figures folder is not writable")


def _require(path: Path) -> Path:
    if not path.is_file():
        raise InputError(f"{path}: shipped demo file missing; restore it from the repository")
    return path


@dataclass
class Step:
    demo: str
    step: str
    evaluations: int
    seconds: float
    files: list


def run_case(case: DemoCase, folder: Path, quick: bool = False, device: str = "auto", fmt: str = "nrrd",
             console: Console | None = None, figures_dir: Path | None = None) -> list[Step]:
    """Run one demo into ``folder``; returns the steps with their evaluations, times and files."""
    console = console or Console()
    params = (case.quick_params or QUICK) if quick else (case.params or FULL)
    root = resources()
    models, data = root / "Models", root / "SampleData"
    steps: list[Step] = []
    with Outputs(folder, fmt, [], "demo") as outputs:
        outputs.check(["summary.json"])
        t0 = time.perf_counter()
        model = session.load_model(_require(models / case.model), None, device)
        inputs = session.load_inputs([_require(data / name) for name in case.inputs], model)
        input_mask = session.load_mask(_require(data / case.input_mask), None, inputs.geometry, console, "input mask")
        output_mask = session.load_mask(_require(data / case.output_mask), None, inputs.geometry, console,
                                        "output mask")
        steps.append(Step(case.name, "load model and data", 0, time.perf_counter() - t0, []))

        output, predict = session.run_predict(model, inputs, outputs, console)
        steps.append(Step(case.name, "predict", predict["evaluations"], predict["seconds"],
                          [outputs.written["output"]]))

        t0 = time.perf_counter()
        forward = session.run_forward(model, inputs, input_mask, outputs, console, params["forward"], output=output)
        files = [outputs.written[role] for role in ("forward_signed", "forward_normalized", "forward_png")]
        steps.append(Step(case.name, "forward map F", forward.result.evaluations, forward.result.seconds, files))
        steps.append(Step(case.name, "forward files + PNG", 0,
                          time.perf_counter() - t0 - forward.result.seconds, []))

        t0 = time.perf_counter()
        backward = session.run_backward(model, inputs, output_mask, outputs, console, params["backward"],
                                        background_channel=case.background_channel)
        files = [outputs.written[role] for role in ("backward", "backward_blocks", "backward_png")]
        steps.append(Step(case.name, "backward map B", backward.result.evaluations, backward.result.seconds, files))
        steps.append(Step(case.name, "backward files + PNG", 0,
                          time.perf_counter() - t0 - backward.result.seconds, []))

        if figures_dir is not None:
            t0 = time.perf_counter()
            small = dict(dpi=90, max_colors=256, panel_inches=2.5)
            docs = [session.forward_png(Path(figures_dir) / f"{case.name}_forward.png", model, inputs, output,
                                        forward.result, input_mask, forward.axis,
                                        forward.slices[:: max(1, -(-len(forward.slices) // 3))], **small),
                    session.backward_png(Path(figures_dir) / f"{case.name}_backward.png", model, inputs,
                                         backward.result, output_mask, backward.axis, backward.slices[:3],
                                         background_channel=case.background_channel, **small)]
            steps.append(Step(case.name, "documentation PNGs", 0, time.perf_counter() - t0, docs))

        summary = {
            "demo": case.name, "title": case.title, "quick": quick, "model": session.model_summary(model),
            "inputs": [str(p) for p in inputs.paths], "input_mask": case.input_mask, "output_mask": case.output_mask,
            "geometry": inputs.geometry.to_dict(),
            "predict": {"evaluations": predict["evaluations"], "seconds": predict["seconds"]},
            "forward": forward.result.to_dict(), "backward": backward.result.to_dict(),
            "figure_slices": {"forward": forward.slices, "backward": backward.slices, "axis": forward.axis},
            "steps": [{"step": s.step, "evaluations": s.evaluations, "seconds": round(s.seconds, 4)} for s in steps],
        }
        path = outputs.commit(summary)
    steps.append(Step(case.name, "summary", 0, 0.0, [path]))
    return steps


def run_demo(output: Path, quick: bool = False, figures_dir: Path | None = None, device: str = "auto",
             fmt: str = "nrrd", console: Console | None = None, cases: Sequence[DemoCase] = DEMOS) -> list[Step]:
    """Run every demo into ``output/<demo>/`` and print what was written where, with evaluations and times."""
    console = console or Console()
    started = time.perf_counter()
    resources()
    if figures_dir is not None:
        _writable(Path(figures_dir))
    steps: list[Step] = []
    for case in cases:
        console.note(f"demo {case.name}: {case.title}")
        steps += run_case(case, Path(output) / case.name, quick, device, fmt, console, figures_dir)
    total = time.perf_counter() - started
    console.out(f"IBIX demo{' (quick)' if quick else ''}: {total:.1f} s in all")
    for case in cases:
        console.out(f"\n{case.name}: {case.title}  ->  {Path(output) / case.name}")
        for s in (s for s in steps if s.demo == case.name):
            if s.step != "summary":
                evals = f"{s.evaluations:5d} evaluations" if s.evaluations else " " * 17
                console.out(f"  {s.step:<22} {evals}  {s.seconds:6.2f} s")
            for f in s.files:
                console.out(f"      {f}")
    return steps
