"""What one face of IBIX shows and may do: the state machine behind the Slicer module panel and the web page.

A *face* (the Qt widget in ``IBIX.py``, the trame page in ``IBIXWeb``) binds its widgets to a :class:`Controller`
and does nothing else: it forwards clicks to the controller's actions (:meth:`Controller.loadModel`,
:meth:`Controller.runForward`, :meth:`Controller.cancel`, ...), and when the controller says ``changed()`` it
copies the controller's state (status line, progress, card, statistics, what is enabled, ...) into its widgets.
The controller holds no Qt and no trame object: the engine runs through :class:`IBIXLib.logic.Logic`, one job at
a time, polled by a Qt-like timer the face provides; errors and questions go back through the face's callbacks.

State: ``job`` is the engine process in flight (a model check, a run, an estimate or a cohort), or None. While it
is set the run buttons are disabled and Cancel is enabled; the timer polls it every 50 ms (every 5 ms once the run is
about to end, so its result shows without waiting) and never blocks.
"""
import dataclasses
import os
import time
import typing

from . import jobs, scene
from .logic import POLL_INTERVAL_MS, RUNTIMES, _

#: Largest number of input channels a face offers volume selectors for.
MAX_CHANNELS = 4

#: A run whose estimate passes this many seconds starts only after the user said yes.
ASK_ABOVE_SECONDS = 60.0

#: Milliseconds between two polls of a run that is about to end (its child's final record arrived).
FINISHING_POLL_MS = 5

#: The run kinds whose engine run sends an estimate before its first progress record.
ESTIMATED = ("forward", "backward", "atlas")


@dataclasses.dataclass(frozen=True)
class Within:
    """The closed range a numeric setting must lie in (Slicer's parameter node checks it as ``WithinRange``)."""

    low: float
    high: float


def _settings():
    from slicer import vtkMRMLScalarVolumeNode as Volume
    from slicer import vtkMRMLSegmentationNode as Segmentation

    return (
        # name, type, default (None: no node), range
        ("modelPath", str, "", None), ("runtime", str, "cpu", None),
        ("inputVolume0", Volume, None, None), ("inputVolume1", Volume, None, None),
        ("inputVolume2", Volume, None, None), ("inputVolume3", Volume, None, None),
        ("outputVolume", Volume, None, None),
        ("inputSegmentation", Segmentation, None, None), ("inputSegmentId", str, "", None),
        ("outputSegmentation", Segmentation, None, None), ("outputSegmentId", str, "", None),
        ("forwardJitters", int, 8, Within(1, 256)), ("backwardJitters", int, 4, Within(1, 256)),
        ("maxJitter", float, 0.0, Within(0.0, 10000.0)),  # 0: automatic
        ("blocks", int, 500, Within(2, 100000)),
        ("compactness", float, 0.5, Within(0.0001, 1000.0)),  # IBIXLogic.blocks.DEFAULT_COMPACTNESS
        ("progressive", bool, True, None), ("coarseToFine", bool, False, None),
        ("coarseBlocks", int, 50, Within(2, 100000)), ("refineThreshold", float, 0.25, Within(0.0, 1.0)),
        ("normalization", str, "fraction", None), ("signedDisplay", bool, False, None),
        ("colormap", str, "Auto", None), ("opacity", float, 0.6, Within(0.0, 1.0)),
        ("threshold", float, 0.05, Within(0.0, 1.0)), ("showLegend", bool, True, None),
        ("resultVolume", Volume, None, None),
    )


def settingsClass(name="IBIXSettings", withinRange=None):
    """A class declaring every setting of IBIX (annotations and defaults), as Slicer's ``parameterNodeWrapper``
    takes it: ``withinRange(low, high)`` (Slicer's ``WithinRange``) annotates the numeric ranges. Both faces use
    this one list: the module wraps it into its parameter node, the web page holds a :func:`settings` object."""
    annotations, namespace = {}, {}
    for field, kind, default, within in _settings():
        if within is not None and withinRange is not None:
            kind = typing.Annotated[kind, withinRange(within.low, within.high)]
        annotations[field] = kind
        if default is not None:
            namespace[field] = default
    namespace.update(__annotations__=annotations, __doc__="Every setting of the IBIX module (saved with the scene).")
    return type(name, (), namespace)


def settings(**values):
    """Every setting of IBIX as a plain object with its defaults (the web page's parameters), ``values`` set."""
    fields = [(field, kind, dataclasses.field(default=default)) for field, kind, default, _within in _settings()]
    obj = dataclasses.make_dataclass("IBIXSettings", fields)()
    for key, value in values.items():
        if not hasattr(obj, key):
            raise AttributeError(f"no IBIX setting named {key!r}")
        setattr(obj, key, value)
    return obj


# ------------------------------------------------------------------------------------------------------------------
# Settings -> engine parameters
# ------------------------------------------------------------------------------------------------------------------

def forwardParameters(p):
    params = {"n_jitters": int(p.forwardJitters), "signed": bool(p.signedDisplay), "progressive": bool(p.progressive)}
    if p.maxJitter > 0:
        params["max_jitter"] = float(p.maxJitter)
    return params


def atlasParameters(p):
    """The block and jitter parameters of the backward section that a response atlas takes."""
    params = {"n_blocks": int(p.blocks), "compactness": float(p.compactness), "n_jitters": int(p.backwardJitters)}
    if p.maxJitter > 0:
        params["max_jitter"] = float(p.maxJitter)
    return params


def backwardParameters(p):
    params = dict(atlasParameters(p), normalization=p.normalization, progressive=bool(p.progressive))
    if p.coarseToFine:
        params["coarse_blocks"] = int(p.coarseBlocks)
        params["refine_threshold"] = float(p.refineThreshold)
    return params


def displayOptions(p):
    if p is None:
        return {}
    return {"opacity": p.opacity, "threshold": p.threshold, "legend": p.showLegend,
            "colormap": None if p.colormap == "Auto" else p.colormap}


def statisticLabels():
    """Labels of the map statistics (IBIXLogic.statistics), as the faces show them."""
    return {"reach95_mm": _("reach95 (95 % of the map within)"), "inside_fraction": _("inside the mask"),
            "blocks90": _("blocks holding 90 %"), "peak": _("peak value"), "peak_ras_mm": _("peak at RAS")}


def statisticsRows(kind, statistics):
    """(label, value) rows of a map's statistics (empty for an output run)."""
    labels = statisticLabels()
    return [(labels.get(key, key), value) for key, value in jobs.statistics_rows(kind, statistics)]


def estimateText(estimate):
    """One line for the user: predicted model evaluations and time, and what would cut it."""
    seconds = float(estimate.get("seconds") or 0.0)
    duration = (_("about {n} s").format(n=f"{seconds:.1f}") if seconds < 90
                else _("about {n} min").format(n=f"{seconds / 60:.0f}"))
    text = _("Predicted: {evaluations} model evaluations, {duration}").format(
        evaluations=estimate.get("evaluations", "?"), duration=duration)
    advice = [str(a) for a in estimate.get("advice") or []]
    if advice:
        text += " - " + _("to cut it: {advice}").format(advice="; ".join(advice))
    return text


class Controller:
    """One face's IBIX: the settings it edits, the job in flight and everything the face shows about it.

    Parameters
    ----------
    logic : IBIXLib.logic.Logic
        The console logic that starts model checks and runs (``IBIX.IBIXLogic`` in Slicer).
    timer : Qt-like timer
        ``setInterval``, ``connect("timeout()", f)``, ``start``, ``stop``; it polls the job in flight.
    changed : callable, optional
        ``changed()``: the state changed; the face copies it into its widgets.
    error, warning : callable, optional
        ``error(message)``: a run or an action failed (the face shows a dialog; the status line says it too).
    ask : callable, optional
        ``ask(question)``: a yes/no question (a run estimated above a minute); the face calls :meth:`answer`.
    """

    def __init__(self, logic, timer, changed=None, error=None, warning=None, ask=None):
        self.logic = logic
        self.parameters = None     # the settings (the module's parameter node, or settings() in the web page)
        self.job = None
        self.kind = ""
        self.status, self.statusError = "", False
        self.progress = (0, 1)     # (value, maximum); maximum 0: busy without a count
        self.cardSummary, self.deviceSummary, self.channels = "", "", []
        self.statistics = ("", {})  # (kind, statistics) of the last finished map
        self.estimate = ""          # the last estimate, as text
        self.question = ""          # a question waiting for answer()
        self.cohortCases = []       # finished cases of the cohort output folder
        self.live = False           # the live backward map is on (or its atlas is being computed)
        self.atlas = None           # (what it depends on, path) of the last response atlas computed for Live
        self.result = None          # the last finished run that made a map or the output (its node and summary)
        self.views = {}             # run kind -> the slice views (layout names) it is shown in; default all
        self._pendingAtlasKey = None
        self._started = 0.0
        self._confirmed = False     # the user already said yes to this run's estimate
        self._asking = None         # the action to start again when the user says yes
        self._estimateSeen = None
        self._changed = changed or (lambda: None)
        self._error = error or (lambda message: None)
        self._warning = warning or (lambda message: None)
        self._ask = ask or (lambda question: self.answer(False))
        self.timer = timer
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.poll)

    # --- what the face shows ---------------------------------------------------------------------------------

    @property
    def busy(self):
        return self.job is not None or bool(self.question)

    def enabled(self):
        """Which actions the face enables now (name -> bool)."""
        p = self.parameters
        ready = self.logic.modelInfo is not None and not self.busy
        return {"loadModel": not self.busy, "runtime": not self.busy,
                "generateOutput": ready and p is not None,
                "runForward": ready and bool(p and p.inputSegmentation),
                "runBackward": ready and bool(p and p.outputSegmentation),
                "live": ready or self.live,
                "cancel": self.job is not None, "runCohort": ready,
                "openCohortCase": not self.busy and bool(self.cohortCases),
                "coarse": bool(p and p.coarseToFine)}

    def statisticsRows(self):
        return statisticsRows(*self.statistics)

    def inputNodes(self):
        """The input volumes of the settings, one per model channel."""
        n = len(self.logic.modelInfo["channels"]) if self.logic.modelInfo else 1
        return [getattr(self.parameters, f"inputVolume{i}") for i in range(min(n, MAX_CHANNELS))]

    def displayOptions(self, kind):
        """Display options of a map of ``kind`` ("output", "forward", "backward"): the settings', and the views."""
        options = displayOptions(self.parameters)
        if kind in self.views:
            options["views"] = list(self.views[kind])
        return options

    def setParameters(self, parameters):
        self.parameters = parameters
        self._changed()

    # --- the job in flight -----------------------------------------------------------------------------------

    def _setStatus(self, text, error=False):
        self.status, self.statusError = text, error

    def report(self, text):
        """A line for the status bar from the face (what it did without the controller, e.g. volumes loaded)."""
        self._setStatus(text)
        self._changed()

    def _fail(self, error):
        """An error: the status line and the face's dialog, with the same text the console API raises."""
        message = str(error)
        self._setStatus(message, error=True)
        self._changed()
        self._error(message)

    def _begin(self, job, kind, confirmed=False):
        self.job, self.kind, self._confirmed, self._estimateSeen = job, kind, confirmed, None
        self._started = time.perf_counter()
        self.progress = (0, 0 if kind == "model" else 1)
        self._setStatus(_("Checking the model...") if kind == "model" else _("Running {kind}...").format(kind=kind))
        self._changed()
        self.timer.start()

    def poll(self):
        """The timer's slot: progress, an arriving estimate, and the end of the job."""
        job = self.job
        if job is None:
            self.timer.stop()
            return
        job.poll()  # a run's progress and end arrive through its callbacks (_onProgress, _onRunDone)
        # a run about to end (its result on its way into the scene): the next polls at once, events in between
        self.timer.setInterval(FINISHING_POLL_MS if getattr(job, "finishing", False) else POLL_INTERVAL_MS)
        if self.job is job:
            self._checkEstimate(job)
        if job.done and self.job is job:
            self._end()
            if self.kind == "model":
                self._modelChecked(job)
            elif self.question:  # ended for the question: asked now that nothing is in flight
                self._ask(self.question)

    def _end(self):
        self.timer.stop()
        self.job = None
        self.progress = (0, 1)
        self._changed()

    def _checkEstimate(self, job):
        request = getattr(job, "request", None)
        estimate = getattr(job, "estimate", None) if getattr(request, "kind", "") in ESTIMATED else None
        if not estimate or estimate is self._estimateSeen:
            return
        self._estimateSeen = estimate
        self.estimate = estimateText(estimate)
        if (float(estimate.get("seconds") or 0) > ASK_ABOVE_SECONDS and not self._confirmed and self._asking
                and not job.done):
            job.cancel()  # before the mapping's work: the user is asked first (the run ends at the next poll)
            self.question = _("{estimate}.\n\nStart this run?").format(estimate=self.estimate)
        self._changed()

    def answer(self, yes):
        """The user's answer to :attr:`question`: start the run now, or leave it."""
        retry, self._asking, self.question = self._asking, None, ""
        if yes and retry is not None:
            retry(True)
        else:
            self._setStatus(_("Not run. {estimate}").format(estimate=self.estimate))
            self._changed()

    def cancel(self):
        if self.job is not None:
            self.job.cancel()
            self._setStatus(_("Cancelling..."))
            self._changed()

    def sceneClosing(self):
        """The scene closes: a run reads its nodes, so it ends now (the next poll reports it; nothing is added). A
        cohort reads only files and goes on. The atlas and the live map belonged to the scene's input."""
        if self.job is not None and not isinstance(self.job, jobs.CohortRun):
            self.job.cancel()
        self.atlas = None
        self.live = False
        self.logic.stopLive()
        self.parameters = None
        self._changed()

    # --- model ---------------------------------------------------------------------------------------------

    def loadModel(self, path, runtime="cpu"):
        if self.job is not None:
            return
        try:
            if self.logic.ensureDependencies(runtime) == "skipped":
                raise RuntimeError(_("ONNX Runtime is not installed and installs are skipped in testing mode"))
            probe = self.logic.startModelCheck(path, runtime)
        except Exception as error:
            self.cardSummary, self.deviceSummary, self.channels = str(error), "", []
            self._fail(error)
            return
        self.cardSummary = _("Checking {name}...").format(name=os.path.basename(str(path)))
        self.deviceSummary = ""
        self._begin(probe, "model")

    def _modelChecked(self, probe):
        if probe.state != jobs.FINISHED:
            self.cardSummary, self.channels = probe.error, []
            if probe.state != jobs.CANCELLED:
                self._fail(probe.error)
            else:
                self._setStatus(_("Model check cancelled."))
                self._changed()
            return
        self.logic.acceptModel(probe)
        self.cardSummary = self.logic.cardSummary()
        self.deviceSummary = self.logic.deviceSummary()
        self.channels = list(self.logic.modelInfo["channels"])
        self._setStatus(_("Model loaded: {name}").format(name=self.logic.modelInfo.get("name") or
                                                         os.path.basename(self.logic.modelPath)))
        self._changed()

    @staticmethod
    def runtimeDevice(runtime):
        return dict(RUNTIMES).get(runtime, "cpu")

    # --- runs ------------------------------------------------------------------------------------------------

    def _startRun(self, kind, start, again=None, confirmed=False):
        """Start a run (``start(onProgress=, onDone=, poll=False)``); ``again(confirmed)`` starts it anew once the
        user said yes to a long estimate."""
        if self.busy:
            self._warning(_("An IBIX run is in progress: wait for it or press Cancel."))
            return None
        try:
            run = start(onProgress=self._onProgress, onDone=self._onRunDone, poll=False)
        except Exception as error:  # bad input: nothing was started, the scene is unchanged
            self._fail(error)
            return None
        self._asking = again
        self._begin(run, kind, confirmed)
        return run

    def _onProgress(self, done, total, stage):
        total = max(1, int(total))
        self.progress = (min(int(done), total), total)
        text = f"{stage} ({done}/{total})"
        elapsed = time.perf_counter() - self._started
        if 0 < done < total:
            text += ", " + _("about {n} s left").format(n=f"{elapsed * (total - done) / done:.0f}")
        self._setStatus(text)
        self._changed()

    def _onRunDone(self, run):
        """A run ended (main thread). The scene may have been closed and the face hidden meanwhile."""
        p = self.parameters
        if run.request.kind == "atlas":
            self._atlasDone(run)
            return
        if getattr(run, "estimate_only", False):
            self._estimateDone(run)
            return
        self.statistics = (run.request.kind, run.statistics) if run.state == jobs.FINISHED else ("", {})
        if run.state == jobs.FINISHED:
            self.result = run
            if p is not None:
                if run.request.kind == "output":
                    p.outputVolume = run.node
                else:
                    p.resultVolume = run.node
            self._setStatus(run.status + " -> '" + run.node.GetName() + "'")
        elif self.question:
            self._setStatus(self.estimate)
        else:
            self._unfinished(run)
            return
        self._changed()

    def _estimateDone(self, run):
        if run.state == jobs.FINISHED and run.estimate:
            self.estimate = estimateText(run.estimate)
            self._setStatus(self.estimate)
            self._changed()
        else:
            run.error = run.error or _("the engine sent no estimate")
            self._unfinished(run)

    def generateOutput(self):
        return self._startRun(_("generate output"), lambda **kw: self.logic.startGenerateOutput(
            self.inputNodes(), display=self.displayOptions("output"), **kw))

    def runForward(self, confirmed=False, estimateOnly=False):
        """Forward map F of the input segment, over the output volume (or only its estimate)."""
        p = self.parameters
        return self._startRun(_("estimate") if estimateOnly else _("forward mapping"),
                              lambda **kw: self.logic.startForward(
                                  self.inputNodes(), p.inputSegmentation, p.inputSegmentId, outputNode=p.outputVolume,
                                  display=self.displayOptions("forward"), estimateOnly=estimateOnly, **forwardParameters(p),
                                  **kw),
                              None if estimateOnly else self.runForward, confirmed)

    def runBackward(self, confirmed=False, estimateOnly=False):
        """Backward map B of the output segment, over the input volume (or only its estimate)."""
        p = self.parameters
        return self._startRun(_("estimate") if estimateOnly else _("backward mapping"),
                              lambda **kw: self.logic.startBackward(
                                  self.inputNodes(), p.outputVolume, p.outputSegmentation, p.outputSegmentId,
                                  display=self.displayOptions("backward"), estimateOnly=estimateOnly,
                                  **backwardParameters(p),
                                  **kw),
                              None if estimateOnly else self.runBackward, confirmed)

    def estimateForward(self):
        return self.runForward(estimateOnly=True)

    def estimateBackward(self):
        return self.runBackward(estimateOnly=True)

    def applyDisplay(self):
        p = self.parameters
        if not p or not p.resultVolume:
            self._fail(ValueError(_("no result map selected: run a forward or backward mapping first")))
            return
        background = p.resultVolume.GetScene().GetNodeByID(p.resultVolume.GetAttribute("IBIX.background") or "")
        scene.show_overlay(p.resultVolume, background, **self.displayOptions(p.resultVolume.GetAttribute("IBIX.kind")))

    def newMask(self, which, volume):
        """A new segmentation with one empty segment for the input (``which="input"``) or output mask, on
        ``volume``'s grid, selected in the settings. Returns (segmentation node, segment id)."""
        segmentation = volume.GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode", f"IBIX {which} mask")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentId = segmentation.GetSegmentation().AddEmptySegment("", f"{which} region")
        if which == "input":
            self.parameters.inputSegmentation, self.parameters.inputSegmentId = segmentation, segmentId
        else:
            self.parameters.outputSegmentation, self.parameters.outputSegmentId = segmentation, segmentId
        self._changed()
        return segmentation, segmentId

    # --- live backward map: the response atlas of the input once, then B follows the output segment ----------

    def _atlasKey(self):
        """What an atlas depends on: the model, the input volumes (and their voxels) and the block parameters."""
        params = atlasParameters(self.parameters)
        return (self.logic.modelPath, tuple((n.GetID(), n.GetImageData().GetMTime()) for n in self.inputNodes() if n),
                tuple(sorted(params.items())))

    def setLive(self, on, confirmed=False):
        """Live backward map on (the atlas is computed first where needed) or off."""
        if not on:
            self.live = False
            self.logic.stopLive()
            self._changed()
            return
        if self.live:
            return
        try:
            key = self._atlasKey()
        except Exception as error:
            self._fail(error)
            return
        self.live = True
        if self.atlas is not None and self.atlas[0] == key:
            self._startLive(self.atlas[1])
            return
        self._pendingAtlasKey = key
        run = self._startRun(_("response atlas"), lambda **kw: self.logic.startAtlas(
            self.inputNodes(), **atlasParameters(self.parameters), **kw),
            lambda yes: self.setLive(True, yes), confirmed)
        if run is None:  # not started (busy or bad input)
            self.live = False
            self._changed()

    def _atlasDone(self, run):
        if run.state == jobs.FINISHED:
            self.atlas = (self._pendingAtlasKey, run.atlas_path)
            self._setStatus(run.status)
            if self.live:
                self._startLive(run.atlas_path)
            else:
                self._changed()
            return
        self.live = False
        if self.question:
            self._setStatus(self.estimate)
            self._changed()
        else:
            self._unfinished(run)

    def _startLive(self, atlasPath):
        p = self.parameters
        try:
            live = self.logic.startLive(atlasPath, self.inputNodes()[0], p.outputSegmentation, p.outputSegmentId,
                                        normalization=p.normalization, display=self.displayOptions("backward"))
        except Exception as error:
            self.live = False
            self._fail(error)
            return
        if live.error:
            self._setStatus(live.error, error=True)
        else:
            p.resultVolume = live.node
            self._setStatus(_("Live backward map: B follows the output segment as it is painted (no model run)"))
        self._changed()

    # --- cohort ----------------------------------------------------------------------------------------------

    def runCohort(self, manifestPath, outputDir, mapping="forward"):
        if self.busy:
            self._warning(_("An IBIX run is in progress: wait for it or press Cancel."))
            return
        try:
            self.logic._requireModel()
            run = self.logic.startCohort(manifestPath, self.logic.modelPath, outputDir, mapping=mapping or "forward",
                                         onProgress=self._onProgress, onDone=self._cohortDone, poll=False)
        except Exception as error:  # bad paths: nothing was started
            self._fail(error)
            return
        self._begin(run, _("cohort"))

    def _cohortDone(self, run):
        if run.state == jobs.FINISHED:
            self._setStatus(run.status + " -> " + run.files.get("report", ""))
            self.fillCohortCases(run.output_dir)
        else:
            self._unfinished(run)

    def _unfinished(self, run):
        """A job that did not finish: cancelled (the status line says so) or failed (an error)."""
        if run.state == jobs.CANCELLED:
            self._setStatus(_("Cancelled: {reason}").format(reason=run.error))
            self._changed()
        else:
            self._fail(run.error)

    def fillCohortCases(self, outputDir):
        """List the finished cases of ``outputDir/cohort.csv`` (none when there is no cohort there yet)."""
        try:
            rows = self.logic.cohortCases(outputDir) if outputDir else []
        except (ValueError, OSError):
            rows = []
        self.cohortCases = [row["case"] for row in rows if row.get("status") == "ok"]
        self._changed()

    def openCohortCase(self, outputDir, case):
        import json

        try:
            nodes = self.logic.loadCohortCase(outputDir, case, display=self.displayOptions("case"))
        except Exception as error:
            self._fail(error)
            return
        shown = nodes[-1]
        if self.parameters is not None:
            self.parameters.resultVolume = shown
        self.statistics = (shown.GetAttribute("IBIX.kind"), json.loads(shown.GetAttribute("IBIX.statistics") or "{}"))
        self._setStatus(_("Opened case {case}: {count} volumes").format(case=case, count=len(nodes)))
        self._changed()
