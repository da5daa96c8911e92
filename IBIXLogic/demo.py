"""``ibix demo``: both shipped demos end to end (T1 to T2 and MRI to pseudo-CT) on the shipped sample data.

For each demo: load the model and the sample case, predict the output, one forward map F of the shipped input
mask and one backward map B of the shipped output mask (the engine's default exact method), with volumes, PNG
figures and a ``summary.json`` in ``<output>/<demo>/``. ``figures_dir`` also writes small palette PNGs for the
documentation (``docs/images`` in the repository: ``ibix demo --figures docs/images``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import InputError


@dataclass(frozen=True)
class DemoCase:
    """One shipped demo: model, input channels (card order), masks, and the channel shown under B."""

    name: str
    title: str
    model: str
    inputs: tuple[str, ...]
    input_mask: str
    output_mask: str
    background_channel: int = 0


DEMOS = (
    DemoCase("t1_to_t2", "MRI T1 to T2 (2D convolutional autoencoder, ICBM152 T1 sample)",
             "t1_to_t2_cae.onnx", ("IBIX-T1.nrrd",), "IBIX-T1-input-mask.nrrd", "IBIX-T1-output-mask.nrrd"),
    DemoCase("mri_to_pct", "Dixon MRI to pseudo-CT (2D U-Net, procedural pelvis phantom)",
             "mri_to_pct_unet.onnx",
             ("IBIX-Pelvis-water.nrrd", "IBIX-Pelvis-fat.nrrd", "IBIX-Pelvis-inphase.nrrd"),
             "IBIX-Pelvis-input-mask.nrrd", "IBIX-Pelvis-output-mask.nrrd", background_channel=2),
)

#: Parameters of the full and the quick demo.
FULL = {"forward": {"n_jitters": 8}, "backward": {"n_blocks": 500, "n_jitters": 4}}
QUICK = {"forward": {"n_jitters": 4}, "backward": {"n_blocks": 100, "n_jitters": 2}}


def resources() -> Path:
    """The shipped ``Resources`` folder (beside the IBIXLogic package in the repository)."""
    import IBIXLogic

    folder = Path(IBIXLogic.__file__).resolve().parents[1] / "Resources"
    if not (folder / "Models").is_dir() or not (folder / "SampleData").is_dir():
        raise InputError(f"{folder}: the demo models and sample data (Resources/Models, Resources/SampleData) are "
                         "not there; run the demo from a checkout of the IBIX repository (pip install -e .)")
    return folder


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
             console=None, figures_dir: Path | None = None) -> list[Step]:
    """Run one demo into ``folder``; returns the steps with their evaluations, times and files."""
    from . import cli, figures
    from .backward import backward_mapping
    from .forward import forward_mapping

    console = console or cli.Console()
    params = QUICK if quick else FULL
    root = resources()
    models, data = root / "Models", root / "SampleData"
    steps: list[Step] = []
    outputs = cli.Outputs(folder, fmt, [])
    outputs.check(["summary.json"])

    t0 = time.perf_counter()
    model = cli.load_model(_require(models / case.model), None, device)
    inputs = cli.load_inputs([_require(data / name) for name in case.inputs], model)
    input_mask = cli.load_mask(_require(data / case.input_mask), None, inputs.geometry, console, "input mask")
    output_mask = cli.load_mask(_require(data / case.output_mask), None, inputs.geometry, console, "output mask")
    steps.append(Step(case.name, "load model and data", 0, time.perf_counter() - t0, []))

    t0, before = time.perf_counter(), model.evaluations
    with console.progress() as progress:
        output = model.predict(inputs.x, inputs.geometry, progress=progress)
    seconds = time.perf_counter() - t0
    path = outputs.write_volume("output", output, inputs.geometry)
    steps.append(Step(case.name, "predict", model.evaluations - before, seconds, [path]))

    axis = cli.display_axis(model, inputs.geometry, inputs.arrays[0].ndim)
    with console.progress() as progress:
        forward = forward_mapping(model, inputs.x, input_mask, geometry=inputs.geometry, progress=progress,
                                  **params["forward"])
    t0 = time.perf_counter()
    files = [outputs.write_volume("forward_signed", forward.signed, forward.geometry),
             outputs.write_volume("forward_normalized", forward.normalized, forward.geometry)]
    forward_slices = figures.choose_slices(input_mask, axis)
    files.append(cli.forward_png(outputs.path("forward.png"), model, inputs, output, forward, input_mask, axis,
                                 forward_slices))
    outputs.add(files[-1])
    steps.append(Step(case.name, "forward map F", forward.evaluations, forward.seconds, files))
    steps.append(Step(case.name, "forward files + PNG", 0, time.perf_counter() - t0, []))

    with console.progress() as progress:
        backward = backward_mapping(model, inputs.x, output_mask, geometry=inputs.geometry, progress=progress,
                                    **params["backward"])
    t0 = time.perf_counter()
    files = [outputs.write_volume("backward", backward.map, backward.geometry),
             outputs.write_volume("backward_blocks", backward.labels, backward.geometry)]
    backward_slices = figures.choose_slices(output_mask, axis)
    files.append(cli.backward_png(outputs.path("backward.png"), model, inputs, backward, output_mask, axis,
                                  backward_slices, background_channel=case.background_channel))
    outputs.add(files[-1])
    steps.append(Step(case.name, "backward map B", backward.evaluations, backward.seconds, files))
    steps.append(Step(case.name, "backward files + PNG", 0, time.perf_counter() - t0, []))

    if figures_dir is not None:
        t0 = time.perf_counter()
        small = dict(dpi=90, max_colors=256, panel_inches=2.5)
        docs = [cli.forward_png(Path(figures_dir) / f"{case.name}_forward.png", model, inputs, output, forward,
                                input_mask, axis, forward_slices[:: max(1, -(-len(forward_slices) // 3))], **small),
                cli.backward_png(Path(figures_dir) / f"{case.name}_backward.png", model, inputs, backward,
                                 output_mask, axis, backward_slices[:3], background_channel=case.background_channel,
                                 **small)]
        steps.append(Step(case.name, "documentation PNGs", 0, time.perf_counter() - t0, docs))

    summary = {
        "demo": case.name, "title": case.title, "quick": quick,
        "model": {"path": str(model.path), "card": model.card.summary(), "device": model.device,
                  "provider": model.provider},
        "inputs": [str(p) for p in inputs.paths], "input_mask": case.input_mask, "output_mask": case.output_mask,
        "geometry": inputs.geometry.to_dict(),
        "predict": {"evaluations": steps[1].evaluations, "seconds": round(steps[1].seconds, 4)},
        "forward": forward.to_dict(), "backward": backward.to_dict(),
        "figure_slices": {"forward": forward_slices, "backward": backward_slices, "axis": axis},
        "steps": [{"step": s.step, "evaluations": s.evaluations, "seconds": round(s.seconds, 4)} for s in steps],
    }
    summary["files"] = [str(p) for p in outputs.written] + [str(folder / "summary.json")]
    path = outputs.write_json("summary.json", summary)
    steps.append(Step(case.name, "summary", 0, 0.0, [path]))
    return steps


def run_demo(output: Path, quick: bool = False, figures_dir: Path | None = None, device: str = "auto",
             fmt: str = "nrrd", console=None, cases: Sequence[DemoCase] = DEMOS) -> list[Step]:
    """Run every demo into ``output/<demo>/`` and print what was written where, with evaluations and times."""
    from . import cli

    console = console or cli.Console()
    started = time.perf_counter()
    resources()
    if figures_dir is not None:
        cli.Outputs(Path(figures_dir), fmt, []).check([])
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
