"""The IBIX module's logic without Slicer's module classes: the model, the engine processes and every run.

:class:`Logic` is the console API (``IBIX.IBIXLogic`` is this class with Slicer's module logic base) and what every
face drives through :mod:`IBIXLib.controller`: the Slicer widget and the web page alike. It never imports Qt: the
runs it polls by itself use a Qt-like timer made by ``timerFactory`` (``qt.QTimer`` in Slicer, an asyncio timer in
the web page).
Every run computes in a separate Python process (:mod:`IBIXLib.jobs`), so ONNX Runtime is never imported here.
"""
import os

import IBIXLogic as ibx

from . import dependencies, jobs, scene
from . import tr as _

#: Milliseconds between two polls of a running engine process (a poll costs well under a millisecond).
POLL_INTERVAL_MS = 50

#: Milliseconds from a run's end to the start of a new engine process for the next run, where the run's own cannot
#: serve it (cancelled, crashed): its start-up takes a CPU core for about a second, and the run's result is drawn
#: first.
PRESTART_DELAY_MS = 500

#: Runtime choices (the module's runtime selector order) -> dependencies runtime and engine device.
RUNTIMES = (("cpu", "cpu"), ("gpu", "cuda"))


class Logic:
    """Console API. Every run computes in a separate Python process (the same runner as the GUI). Example::

        import IBIX
        logic = IBIX.IBIXLogic()
        logic.loadModel("/path/t1_to_t2_cae.onnx")            # runtime="gpu" for an NVIDIA GPU
        t1 = slicer.util.getNode("IBIX-T1")
        seg = slicer.util.getNode("IBIX-T1 input mask")
        sid = seg.GetSegmentation().GetNthSegmentID(0)
        print(logic.estimateForward([t1], seg, sid, n_jitters=8))  # evaluations, seconds, advice; nothing runs
        fmap = logic.runForward([t1], seg, sid, n_jitters=8)  # waits; Slicer stays responsive
        run = logic.startForward([t1], seg, sid, onDone=lambda run: print(run.state, run.node))  # returns at once
        print(run.estimate, run.statistics)                    # once finished: reach95_mm, peak, ...
        files = logic.runCohort("manifest.csv", "/path/t1_to_t2_cae.onnx", "/out", workers=2)  # waits
        nodes = logic.loadCohortCase("/out", "case1")          # the case's input and maps, new nodes
        atlas = logic.runAtlas([t1], n_blocks=500)              # response atlas of the input (waits) -> path
        live = logic.startLive(atlas, t1, outSeg, outSid)      # B follows the output segment as it is painted
        logic.stopLive()

    Synchronous calls raise exceptions (``IBIXLogic.IBIXError``, a ValueError, or ``IBIXLogic.Cancelled``) with
    the text the GUI shows; a failed or cancelled run leaves the scene unchanged.
    """

    def __init__(self, launcher=None, python=None, timerFactory=None):
        self.modelPath = None
        self.modelInfo = None        # card, device and provider reported by the engine process
        self.runtime = "cpu"
        self.launcher = launcher     # how engine processes start (default: slicer.util.launchConsoleProcess)
        self.python = python         # and with which Python (default: PythonSlicer)
        self.timerFactory = timerFactory  # makes Qt-like timers for runs polled in the background (qt.QTimer)
        self.prestart = True         # keep an engine process started for the next runs (hides its start-up, keeps
        #                              the engine's caches: the loaded model, measured response radii)
        self._standby = None
        self._prestartTimer = None
        self._pollers = []
        self._live = None            # the live backward map (IBIXLib.live.LiveBackward) while it is on
        self._liveNode = None        # its B node, reused when Live is turned on again for the same input

    # --- dependencies and model ------------------------------------------------------------------------------

    def ensureDependencies(self, runtime="cpu", prompt=True):
        """Install what ``runtime`` ("cpu" or "gpu") needs, after asking; "ready", "installed" or "skipped"."""
        result = dependencies.ensure(runtime, prompt=prompt)
        if result == "installed":  # the engine process kept for the next run imported the packages as they were
            self.stopStandby()
        return result

    @staticmethod
    def device(runtime):
        return dict(RUNTIMES).get(runtime, "cpu")

    def startModelCheck(self, path, runtime="cpu"):
        """Start loading the model in an engine process (returns at once); pass the ended probe to acceptModel."""
        return jobs.probe_model(path, self.device(runtime), launcher=self.launcher, python=self.python)

    def acceptModel(self, probe):
        if probe.state != jobs.FINISHED:
            raise ibx.ModelError(probe.error)
        self.modelPath = probe.process.args[probe.process.args.index("--model") + 1]
        self.modelInfo = probe.info
        self.runtime = "gpu" if probe.info.get("requested") == "cuda" else "cpu"
        self._prestart()
        return self.modelInfo

    def _prestart(self):
        """Start the engine process of the next runs now (Python and the engine's imports take ~0.5 s), unless the
        one kept is started the same way (another runtime chosen: a new one)."""
        if self._standby is not None and not self._standby.matches(self.device(self.runtime), self.launcher,
                                                                   self.python):
            self.stopStandby()
        if self.prestart and self._standby is None and self.modelInfo is not None:
            self._standby = jobs.Standby(self.device(self.runtime), self.launcher, self.python)

    def _keep(self, standby):
        """After a run: keep its engine process for the next runs where it can serve them (it goes on, is free and
        started the same way; one is kept at most), else start a new one later."""
        device = self.device(self.runtime)
        if standby is not None and (not self.prestart or self._standby is not None
                                    or not standby.matches(device, self.launcher, self.python)):
            standby.stop()
        elif standby is not None and standby.take() is not None:
            if self._prestartTimer is not None:
                self._prestartTimer.stop()
            self._standby = standby
            return
        self._prestartLater()

    def _prestartLater(self):
        """:meth:`_prestart` after PRESTART_DELAY_MS (at once without a timer factory)."""
        if self.timerFactory is None:
            self._prestart()
            return
        if self._prestartTimer is None:
            self._prestartTimer = self.timerFactory()
            self._prestartTimer.setSingleShot(True)
            self._prestartTimer.setInterval(PRESTART_DELAY_MS)
            self._prestartTimer.connect("timeout()", self._prestart)
        self._prestartTimer.start()

    def stopStandby(self):
        """End the engine process kept for the next run (the module does it on exit)."""
        if self._prestartTimer is not None:
            self._prestartTimer.stop()
        if self._standby is not None:
            self._standby.stop()
            self._standby = None

    def loadModel(self, path, runtime="cpu", installDependencies=True):
        """Check an ONNX model and its card (``<model>.json``) in an engine process; returns what it reported.

        runtime: "cpu" or "gpu" (NVIDIA, CUDA). With ``installDependencies``, missing Python packages are
        installed first, after asking.
        """
        if installDependencies and self.ensureDependencies(runtime) == "skipped":
            raise RuntimeError(_("ONNX Runtime is not installed and installs are skipped in testing mode"))
        probe = self.startModelCheck(path, runtime)
        jobs.wait(probe, idle=_processEvents)
        return self.acceptModel(probe)

    def _requireModel(self):
        if self.modelInfo is None:
            raise ibx.InputError("no model loaded: call loadModel(path) (GUI: choose the ONNX file, Load model)")
        return self.modelInfo

    def cardSummary(self):
        info = self._requireModel()
        channels = ", ".join(info["channels"])
        dims = f"{info['spatial_dims']}D" + (f" ({info['slice_axis']} slices)" if info["spatial_dims"] == 2 else "")
        name = info.get("name") or os.path.basename(self.modelPath or "")
        return _("{name}: {n} channel(s) [{channels}], {dims}, output units {units}").format(
            name=name, n=len(info["channels"]), channels=channels, dims=dims, units=info.get("units") or "?")

    def deviceSummary(self):
        """The device and ONNX Runtime provider that really run the model, and whether that is what was asked."""
        info = self._requireModel()
        text = f"{info['device']} ({info['provider']})"
        if info.get("requested") == "cuda" and info["device"] != "cuda":
            text += " - " + _("the NVIDIA GPU was asked for but the CPU runs the model (CUDA could not start)")
        return text

    # --- runs: start* return at once (the run is polled by a timer), run* wait for the result ----------------

    def _start(self, request, display=None, onProgress=None, onDone=None, poll=True, runClass=None,
               estimateOnly=False, **runOptions):
        self._requireModel()
        if estimateOnly:  # the engine says what the run would cost, and runs nothing
            runOptions["estimate_only"] = True

        def done(run):
            try:
                if onDone is not None:
                    onDone(run)
            finally:  # the engine process of the next runs: this run's, or a new one once its result is drawn
                self._keep(run.standby)

        if self._prestartTimer is not None:  # this run ends with its own (no start-up beside its engine)
            self._prestartTimer.stop()
        standby, self._standby = self._standby, None
        run = (runClass or jobs.Run)(request, self.modelPath, device=self.device(self.runtime), display=display,
                                     on_progress=onProgress, on_done=done, launcher=self.launcher,
                                     python=self.python, **runOptions)
        try:
            run.start(standby)
        except Exception:  # refused before it ran: its engine process serves the next run
            self._keep(standby)
            raise
        if poll:
            self._poll(run)
        return run

    def _poll(self, run):
        self._pollers.append(_Poller(run, self._pollers, self.timerFactory()))

    def startGenerateOutput(self, inputNodes, name=None, display=None, **kw):
        """Start generating the output (returns the run at once); ``onDone(run)`` gets the new volume as run.node
        (``display={"views": [...]}``: shown in those slice views only)."""
        request = scene.prepare_request("output", self._requireModel()["channels"], _asList(inputNodes), name=name)
        return self._start(request, display, **kw)

    def startForward(self, inputNodes, segmentationNode, segmentId, outputNode=None, signed=False, name=None,
                     display=None, onProgress=None, onDone=None, poll=True, estimateOnly=False, **params):
        """Start a forward map F of an input segment (returns the run at once); shown over ``outputNode``.

        ``run.estimate`` holds the engine's prediction once it arrives (before any progress): ``evaluations``,
        ``seconds`` and ``advice`` (what would cut it). With ``estimateOnly`` nothing else is computed."""
        request = scene.prepare_request("forward", self._requireModel()["channels"], _asList(inputNodes),
                                        segmentationNode, segmentId, output_node=outputNode,
                                        display="signed" if signed else "normalized", name=name, **params)
        return self._start(request, display, onProgress, onDone, poll, estimateOnly=estimateOnly)

    def startBackward(self, inputNodes, outputNode, segmentationNode, segmentId, name=None, display=None,
                      onProgress=None, onDone=None, poll=True, estimateOnly=False, **params):
        """Start a backward map B of an output segment (returns the run at once); shown over the input.
        ``run.estimate`` and ``estimateOnly`` as for :meth:`startForward`."""
        request = scene.prepare_request("backward", self._requireModel()["channels"], _asList(inputNodes),
                                        segmentationNode, segmentId, output_node=outputNode, name=name, **params)
        return self._start(request, display, onProgress, onDone, poll, estimateOnly=estimateOnly)

    def estimateForward(self, inputNodes, segmentationNode, segmentId, outputNode=None, **params):
        """What :meth:`runForward` with these arguments would cost, computing no map (waits) ->
        ``{"evaluations": int, "seconds": float, "advice": [str, ...]}``."""
        return _finished(self.startForward(inputNodes, segmentationNode, segmentId, outputNode, poll=False,
                                           estimateOnly=True, **params)).estimate

    def estimateBackward(self, inputNodes, outputNode, segmentationNode, segmentId, **params):
        """What :meth:`runBackward` with these arguments would cost, computing no map (waits); as
        :meth:`estimateForward`."""
        return _finished(self.startBackward(inputNodes, outputNode, segmentationNode, segmentId, poll=False,
                                            estimateOnly=True, **params)).estimate

    def generateOutput(self, inputNodes, name=None):
        """Run the model -> NEW volume node with the generated output (waits; Slicer stays responsive)."""
        return _result(self.startGenerateOutput(inputNodes, name=name, poll=False))

    def runForward(self, inputNodes, segmentationNode, segmentId, outputNode=None, **params):
        """Forward map F of an input segment -> NEW volume node (``signed=True`` for signed F). Waits."""
        return _result(self.startForward(inputNodes, segmentationNode, segmentId, outputNode, poll=False, **params))

    def runBackward(self, inputNodes, outputNode, segmentationNode, segmentId, **params):
        """Backward map B of an output segment -> NEW volume node on the input grid. Waits."""
        return _result(self.startBackward(inputNodes, outputNode, segmentationNode, segmentId, poll=False, **params))

    # --- live backward maps: the response atlas of the input, then B of the output segment as it is painted -----

    def startAtlas(self, inputNodes, outputDir=None, onProgress=None, onDone=None, poll=True, **params):
        """Start ``ibix atlas`` of the input in the engine process (returns the run at once); once finished,
        ``run.atlas_path`` is ``outputDir/atlas.npz`` (default: a new temporary folder). Params: n_blocks,
        compactness, blocks, n_jitters, max_jitter."""
        request = scene.prepare_request("atlas", self._requireModel()["channels"], _asList(inputNodes), **params)
        return self._start(request, None, onProgress, onDone, poll, runClass=jobs.AtlasRun, output_dir=outputDir)

    def runAtlas(self, inputNodes, outputDir=None, **params):
        """The response atlas of the input -> its path (waits; Slicer stays responsive)."""
        return _finished(self.startAtlas(inputNodes, outputDir, poll=False, **params)).atlas_path

    def startLive(self, atlasPath, inputNode, segmentationNode, segmentId, normalization="fraction", display=None):
        """Show B of the output segment from the atlas now and again each time the segment is painted (no model
        evaluation; at most every ~150 ms); returns the :class:`IBIXLib.live.LiveBackward` (``.node`` is B).
        Ends any live map already on; :meth:`stopLive` ends it."""
        from IBIXLib import live

        self.stopLive()
        previous = self._liveNode if self._liveNode is not None and self._liveNode.GetAttribute(
            "IBIX.background") == inputNode.GetID() else None  # B of this input: written again, no new node
        self._live = live.LiveBackward(atlasPath, inputNode, segmentationNode, segmentId,
                                       normalization=normalization, display=display, node=previous,
                                       timer=self.timerFactory()).start()
        self._liveNode = self._live.node
        return self._live

    def stopLive(self):
        """Stop updating the live backward map (its node stays)."""
        live, self._live = getattr(self, "_live", None), None
        if live is not None:
            live.stop()

    # --- cohorts: ibix cohort in the engine process, then open any case's maps ---------------------------------

    def startCohort(self, manifestPath, modelPath, outputDir, mapping="forward", cardPath=None, workers=2,
                    runtime=None, onProgress=None, onDone=None, poll=True):
        """Start ``ibix cohort`` on a manifest (CSV) in an engine process; returns the run at once.

        ``onProgress(done, total, stage)`` counts cases; ``onDone(run)`` gets the ended run: ``run.files`` holds
        ``cohort_csv`` and ``report`` (paths), ``run.cases`` the counts. Results stay in ``outputDir`` (a rerun
        skips the cases done); open a case with :meth:`loadCohortCase`.
        """
        run = jobs.CohortRun(manifestPath, modelPath, outputDir, mapping=mapping, card_path=cardPath,
                             workers=workers, device=self.device(runtime or self.runtime), on_progress=onProgress,
                             on_done=onDone, launcher=self.launcher, python=self.python)
        run.start()
        if poll:
            self._poll(run)
        return run

    def runCohort(self, manifestPath, modelPath, outputDir, mapping="forward", cardPath=None, workers=2,
                  runtime=None, onProgress=None, onDone=None):
        """Run a cohort (waits; Slicer stays responsive) -> {"cohort_csv": path, "report": path}."""
        run = self.startCohort(manifestPath, modelPath, outputDir, mapping, cardPath, workers, runtime,
                               onProgress=onProgress, onDone=onDone, poll=False)
        return _finished(run).files

    @staticmethod
    def cohortCases(outputDir):
        """The rows of ``outputDir/cohort.csv`` (case, status, error, evaluations, seconds, statistics)."""
        return jobs.cohort_cases(outputDir)

    def loadCohortCase(self, outputDir, case, display=None):
        """Open a finished case of a cohort: its first input and its maps as NEW volume nodes, each map shown over
        the input. Returns the new nodes (input first); each map node's ``IBIX.statistics`` attribute holds its
        statistics (JSON)."""
        summary, maps = jobs.case_maps(outputDir, case)
        return scene.add_case_maps(case, summary, maps, **(display or {}))


class _Poller:
    """Polls one run with a Qt-like timer until it ends (asynchronous console runs)."""

    def __init__(self, run, registry, timer):
        self.run, self.registry = run, registry
        self.timer = timer
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.poll)
        self.timer.start()

    def poll(self):
        self.run.poll()
        if self.run.done:
            self.timer.stop()
            if self in self.registry:
                self.registry.remove(self)


def _processEvents():
    import slicer

    app = getattr(slicer, "app", None)
    if app is not None:
        app.processEvents()


def _finished(run):
    """Wait for a run or a cohort (the GUI keeps repainting) and return it finished, or raise its error."""
    jobs.wait(run, idle=_processEvents)
    if run.state == jobs.FINISHED:
        return run
    if run.state == jobs.CANCELLED:
        raise ibx.Cancelled(run.error)
    raise ibx.IBIXError(run.error)


def _result(run):
    """Wait for a run and return its result node, or raise its error."""
    return _finished(run).node


def _asList(nodes):
    if nodes is None:
        return []
    return list(nodes) if isinstance(nodes, (list, tuple)) else [nodes]
