"""The cost of a mapping said before it runs: predicted model evaluations and time, and what would cut them.

A mapping first plans its work (the response radius, the blocks, tiles or groups: what it will run through the
model), then times its first batch of jittered inputs. From the planned evaluations and voxels and the time per voxel
of that batch, :class:`Forecast` predicts the whole run and hands an :class:`Estimate` to the caller once, before any
progress is reported: the command line prints it (``ibix ... --estimate`` prints it and stops), the JSON-lines
protocol sends it as ``{"stage": "estimate", ...}``, and :func:`estimate` returns it without running the rest.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

#: Predicted seconds from which an estimate says what would cut the time (and the command line prints it).
ADVICE_FROM_SECONDS = 10.0
#: Seconds of a first timed batch after which the estimate does not wait for a second one.
TIMED_ENOUGH = 2.0


@dataclass
class Estimate:
    """A mapping's predicted cost: ``evaluations`` (model evaluations of the whole run: the response radius, the
    unperturbed outputs and the jittered inputs), ``seconds`` (wall time of the mapping), ``advice`` (what would
    cut it, in words), ``note`` (what the prediction leaves out, if anything), the ``device`` and the model work
    against brute force's (``work``, ``brute_force``: whole samples)."""

    evaluations: int
    seconds: float
    advice: list[str] = field(default_factory=list)
    note: str | None = None
    device: str = "cpu"
    work: float = 0.0
    brute_force: float = 0.0

    def record(self) -> dict:
        """The JSON-lines record ``{"stage": "estimate", "evaluations", "seconds", "advice", ...}``."""
        return {"stage": "estimate", "evaluations": int(self.evaluations), "seconds": round(float(self.seconds), 3),
                "advice": list(self.advice), "note": self.note, "device": self.device,
                "work": round(self.work, 2), "brute_force": round(self.brute_force, 2)}

    def describe(self) -> str:
        """One line for a console: ``estimate: 23,000 model evaluations, about 19 min on cpu``, then the advice."""
        text = f"estimate: {self.evaluations:,} model evaluations, about {duration(self.seconds)} on {self.device}"
        if self.note:
            text += f" ({self.note})"
        if self.advice:
            text += "; to cut it: " + "; ".join(self.advice)
        return text


def duration(seconds: float) -> str:
    """Seconds in words: ``0.4 s``, ``12 s``, ``3.5 min``, ``2.1 h``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def advice(kind: str, seconds: float, device: str, n_jitters: int, n_blocks: int | None = None,
           local: bool = True, coarse: bool = False, work: float = 0.0) -> list[str]:
    """What would cut a long run (from ADVICE_FROM_SECONDS on), with the time each choice would take.

    ``kind`` is "forward", "backward" or "atlas"; ``seconds`` the predicted time, of which the jittered inputs take
    nearly all on a long run: their number is proportional to N and, for a backward map or an atlas, to the blocks
    evaluated (all K without locality, those near the mask with it: about proportional to K too).
    """
    if seconds < ADVICE_FROM_SECONDS:
        return []
    found = []
    if device != "cuda":
        found.append("an NVIDIA GPU (the GPU runtime, device 'cuda')")
    if n_jitters > 1:
        fewer = max(1, n_jitters // 2)
        found.append(f"fewer jitters (N = {fewer} instead of {n_jitters}): about {duration(seconds * fewer / n_jitters)}")
    if kind in ("backward", "atlas") and n_blocks and n_blocks > 1:
        fewer = max(1, n_blocks // 2)
        found.append(f"fewer blocks (K = {fewer} instead of {n_blocks}): about {duration(seconds * fewer / n_blocks)}")
    if kind == "backward" and not local and not coarse:
        found.append("coarse-to-fine (coarse blocks, e.g. 10): the finer blocks only where B is high")
    if kind == "backward":
        found.append("the response atlas, when several output masks are explained on one input: every block "
                     "evaluated once, then each mask answered in milliseconds")
    return found


class EstimateReady(Exception):
    """Raised by :func:`estimate`'s callback to stop a mapping once its estimate is known."""

    def __init__(self, found: Estimate):
        super().__init__("estimate ready")
        self.estimate = found


class Forecast:
    """Predicts a mapping's cost from its plan and its first timed batch, and reports it once.

    The mapping creates it when it starts (``started``: its perf_counter start; the model's counters then; ``unit``:
    the voxels of one whole sample, in which model work is counted), calls
    :meth:`plan` with the evaluations and voxels of every batch of jittered inputs it is about to run, and the
    perturber calls :meth:`timed` after each batch; the first batch after a plan sends the estimate. :meth:`finish`
    sends it at the end if no batch ran. ``advise(seconds)`` gives the advice for a predicted time.
    """

    def __init__(self, model: Any, started: float, report: Callable[[Estimate], None],
                 advise: Callable[[float], list[str]], unit: float, brute_force: float = 0.0):
        self.model, self.started, self.report, self.advise = model, started, report, advise
        self.evaluations, self.voxels = model.evaluations, model.evaluated_voxels
        self.unit, self.brute_force = float(unit), brute_force
        self.planned_evaluations, self.planned_voxels = 0, 0.0
        self.armed = self.sent = False
        self.batches: list[tuple[int, float, float]] = []
        self.held: tuple | None = None  # a progress report held back until the estimate is sent
        self.note: str | None = None

    def plan(self, evaluations: int, voxels: float) -> None:
        """Jittered inputs about to run: ``evaluations`` model evaluations of ``voxels`` voxels in all."""
        self.planned_evaluations += int(evaluations)
        self.planned_voxels += float(voxels)
        self.armed = True

    def timed(self, evaluations: int, voxels: float, seconds: float) -> None:
        """A batch of planned inputs ran (``evaluations`` of ``voxels`` voxels in ``seconds``, building the batch
        and summing its responses included, and what the mapping did with the batch before). The estimate goes
        at the second batch, at its time per voxel (the first one also pays ONNX Runtime's first allocations), or
        at the first one when it took more than TIMED_ENOUGH seconds."""
        if not self.armed or self.sent:
            return
        self.batches.append((evaluations, voxels, seconds))
        if len(self.batches) >= 2 or seconds > TIMED_ENOUGH:
            last = self.batches[-1]
            rate = last[2] / last[1] if last[1] else 0.0
            voxels = sum(b[1] for b in self.batches)
            self._send(sum(b[0] for b in self.batches), voxels, rate * voxels)

    def gate(self, progress: Callable[[int, int, str], None] | None) -> Callable[[int, int, str], None] | None:
        """``progress`` held back until the estimate is sent (the last report held is given right after it), so
        that the estimate comes first."""
        if progress is None:
            return None

        def gated(done: int, total: int, message: str) -> None:
            if self.sent:
                progress(done, total, message)
            else:
                self.held = (progress, (done, total, message))
        return gated

    def finish(self) -> None:
        """Send the estimate if it was not sent yet (nothing, or a single batch, to evaluate)."""
        if not self.sent:
            self._send(sum(b[0] for b in self.batches), sum(b[1] for b in self.batches),
                       sum(b[2] for b in self.batches))

    def _send(self, evaluations: int, voxels: float, seconds: float) -> None:
        self.sent = True
        model = self.model
        remaining = max(self.planned_voxels - voxels, 0.0)
        rate = seconds / voxels if voxels else 0.0
        predicted = time.perf_counter() - self.started + rate * remaining
        total = model.evaluations - self.evaluations + max(self.planned_evaluations - evaluations, 0)
        work = (model.evaluated_voxels - self.voxels + remaining) / self.unit
        self.report(Estimate(int(total), float(predicted), self.advise(predicted), self.note, model.device, work,
                             self.brute_force))
        if self.held is not None:
            progress, arguments = self.held
            self.held = None
            progress(*arguments)


def estimate(mapping: Callable[..., Any], *args: Any, **parameters: Any) -> Estimate:
    """The estimate of ``mapping(*args, **parameters)`` (:func:`IBIXLogic.forward_mapping`,
    :func:`IBIXLogic.backward_mapping` or :func:`IBIXLogic.block_response_atlas`), without running it past its first
    batch of jittered inputs: the response radius is measured (and kept for the run that follows in this process),
    the blocks cut, the work planned, one batch timed."""
    found: list[Estimate] = []

    def stop(result: Estimate) -> None:
        found.append(result)
        raise EstimateReady(result)

    try:
        mapping(*args, estimate=stop, **parameters)
    except EstimateReady:
        pass
    return found[0]
