"""IBIX: Instance-Based Inference eXplainers for image-to-image ONNX generators, as a 3D Slicer module.

The widget is thin: it reads the GUI, asks the console logic (``IBIXLogic`` class below) to start a run, and polls
the run with a timer. The engine package is imported as ``ibx``; it runs in a separate Python process
(``IBIXLib.jobs``), so ONNX Runtime is never imported into Slicer itself. ``IBIXLib.scene`` reads the scene and
shows results; ``IBIXLib.dependencies`` installs the Python packages, after asking.
"""
import json
import logging
import os
from typing import Annotated

import qt
import vtk

import IBIXLogic as ibx
import slicer
from IBIXLib import dependencies, jobs, scene
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

#: Largest number of input channels the GUI offers selectors for.
MAX_CHANNELS = 4

#: Milliseconds between two polls of a running engine process (a poll costs well under a millisecond).
POLL_INTERVAL_MS = 50

#: Runtime choices of the GUI (runtimeComboBox order) -> dependencies runtime and engine device.
RUNTIMES = (("cpu", "cpu"), ("gpu", "cuda"))

HOMEPAGE = "https://github.com/ibix-project/SlicerIBIX"


def _moduleDir():
    return os.path.dirname(os.path.abspath(__file__))


def _resourceCandidates(*parts):
    """Where shipped data lives: beside the installed module, or in the source tree (Resources/ at the top)."""
    here = _moduleDir()
    return [os.path.join(here, "IBIXData", *parts), os.path.join(here, "..", "Resources", *parts),
            os.path.join(here, "Resources", *parts)]


def _findResource(*parts):
    for candidate in _resourceCandidates(*parts):
        if os.path.exists(candidate):
            return os.path.normpath(candidate)
    return None


def statisticLabels():
    """Labels of the map statistics (IBIXLogic.statistics), as the module shows them."""
    return {"reach95_mm": _("reach95 (95 % of the map within)"), "inside_fraction": _("inside the mask"),
            "blocks90": _("blocks holding 90 %"), "peak": _("peak value"), "peak_ras_mm": _("peak at RAS")}


#
# IBIX
#

class IBIX(ScriptedLoadableModule):
    """Module description (Slicer scripted module)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("IBIX")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Image Synthesis")]
        self.parent.dependencies = []
        self.parent.contributors = ["IBIX contributors"]
        self.parent.helpText = _("""
Explain an image-to-image generator (ONNX model with an IBIX model card), e.g. MRI T1 to T2 or MRI to pseudo-CT.
<b>Forward map F</b>: paint an input region; F shows which output voxels react to it (shown over the output).
<b>Backward map B</b>: paint an output region; B shows which input regions drive it (shown over the input).
See the <a href="{homepage}">documentation</a>.
""").format(homepage=HOMEPAGE)
        self.parent.acknowledgementText = _("""
IBIX was developed by the IBIX contributors. Demo models are trained on synthetic data and are not for clinical use.
""")
        tooOld = dependencies.slicer_version_problem()
        if tooOld:  # said at start-up, rather than as failures later (installs refuse with it too)
            logging.error(tooOld)
            self.parent.helpText = f"<p><b>{tooOld}</b></p>" + self.parent.helpText
            slicer.app.connect("startupCompleted()", lambda: slicer.util.errorDisplay(tooOld, windowTitle=_("IBIX")))
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data (local files shipped with the extension)
#

#: SHA-256 of each sample file: Sample Data re-copies a cached file whose checksum differs (an updated sample).
SAMPLE_SHA256 = {
    "IBIX-T1.nrrd": "11602a74f818c0a3820d4165ae3800b5338d873d427598483802c8b9fb187e3b",
    "IBIX-T1-input-mask.nrrd": "c01daf7cd218ede51c56438d40f2944d065b570ed1bc49bd5a6c0032d21944bf",
    "IBIX-T1-output-mask.nrrd": "32e50d814e16ea4f4ac56a865bc662937c237d947fd713d82cd68c4b1425f1b8",
    "IBIX-Pelvis-water.nrrd": "c14cac2f0fb9c358a273911ec562b325977fdbbad6dffd7e9aeaf865acfd5ddf",
    "IBIX-Pelvis-fat.nrrd": "c361cdf4702cd3c5f3395c50e88db3b6ad7ebe36e13b76de90639c45e6d7b207",
    "IBIX-Pelvis-inphase.nrrd": "985aedfbc01c449fed127c29f81edac93aae30e7c368b832fea3a5ac7de28603",
    "IBIX-Pelvis-ct.nrrd": "3e003aac31854e06381fa2967e7e1585530a9505b1179087603aa6b205f79945",
    "IBIX-Pelvis-input-mask.nrrd": "07e3b15b7c0bf118096b82fc27d9b9a1d663f3087f31170d858919f440023a5d",
    "IBIX-Pelvis-output-mask.nrrd": "aaa293013908209ad45479cdb71b4fdcbadf6b04ce40338550196b95ebc988be",
}


def registerSampleData():
    """Register the IBIX sample cases with the Sample Data module (category "IBIX"), from local files."""
    try:
        import SampleData
    except ImportError:
        return
    sampleDir = _findResource("SampleData")
    if sampleDir is None:
        logging.info("IBIX: no sample data folder found; sample data not registered")
        return
    icon = _findResource("Icons", "IBIX.png") or os.path.join(_moduleDir(), "Resources", "Icons", "IBIX.png")

    def uris(fileNames):
        import pathlib

        return [pathlib.Path(sampleDir, name).resolve().as_uri() for name in fileNames]

    cases = [
        (_("IBIX T1 brain"), ["IBIX-T1.nrrd", "IBIX-T1-input-mask.nrrd", "IBIX-T1-output-mask.nrrd"],
         ["IBIX-T1", "IBIX-T1 input mask", "IBIX-T1 output mask"],
         ["VolumeFile", "SegmentationFile", "SegmentationFile"]),
        (_("IBIX pelvis (Dixon MRI + CT)"),
         ["IBIX-Pelvis-water.nrrd", "IBIX-Pelvis-fat.nrrd", "IBIX-Pelvis-inphase.nrrd", "IBIX-Pelvis-ct.nrrd",
          "IBIX-Pelvis-input-mask.nrrd", "IBIX-Pelvis-output-mask.nrrd"],
         ["IBIX-Pelvis-water", "IBIX-Pelvis-fat", "IBIX-Pelvis-inphase", "IBIX-Pelvis-ct",
          "IBIX-Pelvis input mask", "IBIX-Pelvis output mask"],
         ["VolumeFile"] * 4 + ["SegmentationFile"] * 2),
    ]
    for sampleName, fileNames, nodeNames, fileTypes in cases:
        present = [i for i, name in enumerate(fileNames) if os.path.exists(os.path.join(sampleDir, name))]
        if not present or 0 not in present:
            continue
        names = [fileNames[i] for i in present]
        # file:// URIs: Sample Data copies them into its cache and loads them like downloads.
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="IBIX", sampleName=sampleName, thumbnailFileName=icon,
            uris=uris(names), fileNames=names, nodeNames=[nodeNames[i] for i in present],
            loadFileTypes=[fileTypes[i] for i in present],
            checksums=[f"SHA256:{SAMPLE_SHA256[name]}" for name in names])


#
# Parameter node
#

@parameterNodeWrapper
class IBIXParameterNode:
    """Every setting of the IBIX module (saved with the scene)."""

    modelPath: str = ""
    runtime: str = "cpu"
    inputVolume0: vtkMRMLScalarVolumeNode
    inputVolume1: vtkMRMLScalarVolumeNode
    inputVolume2: vtkMRMLScalarVolumeNode
    inputVolume3: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    inputSegmentation: vtkMRMLSegmentationNode
    inputSegmentId: str = ""
    outputSegmentation: vtkMRMLSegmentationNode
    outputSegmentId: str = ""
    forwardJitters: Annotated[int, WithinRange(1, 256)] = 8
    backwardJitters: Annotated[int, WithinRange(1, 256)] = 4
    maxJitter: Annotated[float, WithinRange(0.0, 10000.0)] = 0.0  # 0: automatic
    blocks: Annotated[int, WithinRange(2, 100000)] = 500
    compactness: Annotated[float, WithinRange(0.0001, 1000.0)] = 0.5  # IBIXLogic.blocks.DEFAULT_COMPACTNESS
    progressive: bool = True
    coarseToFine: bool = False
    coarseBlocks: Annotated[int, WithinRange(2, 100000)] = 50
    refineThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.25
    normalization: str = "fraction"
    signedDisplay: bool = False
    colormap: str = "Auto"
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    threshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.05
    showLegend: bool = True
    resultVolume: vtkMRMLScalarVolumeNode


#
# IBIXWidget
#

class IBIXWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Module panel. Thin: reads the GUI, starts runs through IBIXLogic, polls them, shows results and errors.

    State: ``self._job`` is the engine process in flight (a model check or a run), or None. While it is set, the
    run buttons are disabled, Cancel is enabled, and a timer polls it every 50 ms; it never blocks.
    """

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobKind = ""
        self._timer = None
        self._cohortCases = []   # finished cases of the cohort output folder, as listed in cohortCaseComboBox
        self._atlas = None       # (what it depends on, path) of the last response atlas computed for Live
        self._pendingAtlasKey = None

    # --- setup ---------------------------------------------------------------------------------------------

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/IBIX.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.setupWidgets()

    def setupWidgets(self):
        """Connections and initial state of the widgets in ``self.ui`` (separate from loading the .ui file)."""
        self.logic = self.logic or IBIXLogic()
        self.inputSelectors = [getattr(self.ui, f"inputVolumeSelector{i}") for i in range(MAX_CHANNELS)]
        self.inputLabels = [getattr(self.ui, f"inputVolumeLabel{i}") for i in range(MAX_CHANNELS)]

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.runtimeComboBox.connect("currentIndexChanged(int)", self.onRuntimeChanged)
        gpuUnavailable = dependencies.runtime_unavailable("gpu")
        if gpuUnavailable:  # no onnxruntime-gpu wheel for this platform: offer the CPU only, and say why
            self.ui.runtimeComboBox.removeItem(len(RUNTIMES) - 1)
            self.ui.runtimeComboBox.toolTip = gpuUnavailable
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModel)
        self.ui.generateOutputButton.connect("clicked(bool)", self.onGenerateOutput)
        self.ui.inputMaskSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMaskSelectionChanged)
        self.ui.inputMaskSelector.connect("currentSegmentChanged(QString)", self.onMaskSelectionChanged)
        self.ui.outputMaskSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMaskSelectionChanged)
        self.ui.outputMaskSelector.connect("currentSegmentChanged(QString)", self.onMaskSelectionChanged)
        self.ui.editInputMaskButton.connect("clicked(bool)", lambda: self.onEditMask("input"))
        self.ui.editOutputMaskButton.connect("clicked(bool)", lambda: self.onEditMask("output"))
        self.ui.normalizationComboBox.connect("currentTextChanged(QString)", self.onComboChanged)
        self.ui.colormapComboBox.connect("currentTextChanged(QString)", self.onComboChanged)
        self.ui.runForwardButton.connect("clicked(bool)", self.onRunForward)
        self.ui.runBackwardButton.connect("clicked(bool)", self.onRunBackward)
        self.ui.liveBackwardCheckBox.connect("toggled(bool)", self.onLiveToggled)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.applyDisplayButton.connect("clicked(bool)", self.onApplyDisplay)
        self.ui.runCohortButton.connect("clicked(bool)", self.onRunCohort)
        self.ui.openCohortCaseButton.connect("clicked(bool)", self.onOpenCohortCase)
        self.ui.cohortOutputPathLineEdit.connect("currentPathChanged(QString)", self.onCohortOutputChanged)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPoll)

        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setMaximum(1)
        self.ui.progressBar.setValue(0)
        self.showChannels([])
        self.initializeParameterNode()

    def cleanup(self):
        if self._job is not None:
            self._job.cancel()
        if self.logic is not None:
            self.logic.stopLive()
            self.logic.stopStandby()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanRun)

    def onSceneStartClose(self, caller, event):
        # A run reads nodes of this scene: end it now (the next poll reports it; nothing is added). A cohort reads
        # only files and goes on.
        if self._job is not None and not isinstance(self._job, jobs.CohortRun):
            self._job.cancel()
        self._atlas = None  # the atlas belongs to this scene's input
        self.ui.liveBackwardCheckBox.checked = False
        self.logic.stopLive()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume0:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume0 = first

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanRun):
                self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanRun)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanRun)
            self._updateManualWidgets()
        self._checkCanRun()

    # --- widgets the parameter node wrapper does not connect -------------------------------------------------

    def _updateManualWidgets(self):
        p = self._parameterNode
        widgets = (self.ui.modelPathLineEdit, self.ui.inputMaskSelector, self.ui.outputMaskSelector,
                   self.ui.normalizationComboBox, self.ui.colormapComboBox, self.ui.runtimeComboBox)
        wasBlocked = [w.blockSignals(True) for w in widgets]
        self.ui.modelPathLineEdit.currentPath = p.modelPath
        self.ui.inputMaskSelector.setCurrentNode(p.inputSegmentation)
        if p.inputSegmentId:
            self.ui.inputMaskSelector.setCurrentSegmentID(p.inputSegmentId)
        self.ui.outputMaskSelector.setCurrentNode(p.outputSegmentation)
        if p.outputSegmentId:
            self.ui.outputMaskSelector.setCurrentSegmentID(p.outputSegmentId)
        self.ui.normalizationComboBox.currentText = p.normalization
        self.ui.colormapComboBox.currentText = p.colormap
        self.ui.runtimeComboBox.currentIndex = [r for r, _device in RUNTIMES].index(p.runtime) \
            if p.runtime in [r for r, _device in RUNTIMES] else 0
        for w, b in zip(widgets, wasBlocked):
            w.blockSignals(b)

    def onModelPathChanged(self, path):
        if self._parameterNode:
            self._parameterNode.modelPath = path

    def onRuntimeChanged(self, index):
        if self._parameterNode:
            self._parameterNode.runtime = RUNTIMES[max(0, int(index))][0]

    def onMaskSelectionChanged(self, *args):
        if not self._parameterNode:
            return
        p = self._parameterNode
        p.inputSegmentation = self.ui.inputMaskSelector.currentNode()
        p.inputSegmentId = self.ui.inputMaskSelector.currentSegmentID() or ""
        p.outputSegmentation = self.ui.outputMaskSelector.currentNode()
        p.outputSegmentId = self.ui.outputMaskSelector.currentSegmentID() or ""

    def onComboChanged(self, *args):
        if self._parameterNode:
            self._parameterNode.normalization = self.ui.normalizationComboBox.currentText
            self._parameterNode.colormap = self.ui.colormapComboBox.currentText

    def showChannels(self, channels):
        """Show one input selector per card channel (at least one)."""
        for i, (label, selector) in enumerate(zip(self.inputLabels, self.inputSelectors)):
            visible = i < max(1, len(channels))
            label.visible = visible
            selector.visible = visible
            label.text = _("{channel} volume:").format(channel=channels[i]) if i < len(channels) \
                else _("Input volume:")

    def _checkCanRun(self, caller=None, event=None):
        busy = self._job is not None
        p = self._parameterNode
        hasModel = self.logic.modelInfo is not None
        self.ui.loadModelButton.enabled = not busy
        self.ui.runtimeComboBox.enabled = not busy
        self.ui.generateOutputButton.enabled = hasModel and not busy and bool(p)
        self.ui.runForwardButton.enabled = hasModel and not busy and bool(p and p.inputSegmentation)
        self.ui.runBackwardButton.enabled = hasModel and not busy and bool(p and p.outputSegmentation)
        self.ui.cancelButton.enabled = busy
        self.ui.runCohortButton.enabled = hasModel and not busy
        self.ui.openCohortCaseButton.enabled = not busy and bool(self._cohortCases)
        if p:
            self.ui.coarseBlocksSpinBox.enabled = p.coarseToFine
            self.ui.refineThresholdSpinBox.enabled = p.coarseToFine

    # --- actions -------------------------------------------------------------------------------------------

    def _setStatus(self, text, error=False):
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c0392b;" if error else "")

    def _fail(self, error):
        """Show an error: status line + dialog, with the same text the console API raises."""
        message = str(error)
        self._setStatus(message, error=True)
        logging.error("IBIX: " + message)
        slicer.util.errorDisplay(message, windowTitle=_("IBIX"))

    def _begin(self, job, kind):
        """Poll ``job`` (a started model check or run) until it ends; the GUI shows it is busy meanwhile."""
        self._job, self._jobKind = job, kind
        self.ui.progressBar.setMaximum(0 if kind == "model" else 1)  # 0: busy indicator
        self.ui.progressBar.setValue(0)
        self._setStatus(_("Checking the model...") if kind == "model" else _("Running {kind}...").format(kind=kind))
        self._checkCanRun()
        self._timer.start()

    def onPoll(self):
        job = self._job
        if job is None:
            self._timer.stop()
            return
        job.poll()  # a run's progress and end arrive through its callbacks (_onProgress, _onRunDone)
        if job.done and self._job is job:
            self._end()
            if self._jobKind == "model":
                self._onModelChecked(job)

    def _end(self):
        self._timer.stop()
        self._job = None
        self.ui.progressBar.setMaximum(1)
        self._checkCanRun()

    def onLoadModel(self):
        if self._job is not None:
            return
        p = self._parameterNode
        path = self.ui.modelPathLineEdit.currentPath
        runtime = p.runtime if p else "cpu"
        try:
            if self.logic.ensureDependencies(runtime) == "skipped":
                raise RuntimeError(_("ONNX Runtime is not installed and installs are skipped in testing mode"))
            probe = self.logic.startModelCheck(path, runtime)
        except Exception as error:
            self.ui.cardSummaryLabel.text = str(error)
            self.ui.deviceLabel.text = ""
            self.showChannels([])
            self._fail(error)
            self._checkCanRun()
            return
        self.ui.cardSummaryLabel.text = _("Checking {name}...").format(name=os.path.basename(path))
        self.ui.deviceLabel.text = ""
        self._begin(probe, "model")

    def _onModelChecked(self, probe):
        if probe.state != jobs.FINISHED:
            self.ui.cardSummaryLabel.text = probe.error
            self.showChannels([])
            if probe.state != jobs.CANCELLED:
                self._fail(probe.error)
            else:
                self._setStatus(_("Model check cancelled."))
            self._checkCanRun()
            return
        self.logic.acceptModel(probe)
        self.ui.cardSummaryLabel.text = self.logic.cardSummary()
        self.ui.deviceLabel.text = self.logic.deviceSummary()
        self.showChannels(self.logic.modelInfo["channels"])
        self._setStatus(_("Model loaded: {name}").format(name=self.logic.modelInfo.get("name") or
                                                          os.path.basename(self.logic.modelPath)))
        self._checkCanRun()

    def _inputNodes(self):
        n = len(self.logic.modelInfo["channels"]) if self.logic.modelInfo else 1
        return [getattr(self._parameterNode, f"inputVolume{i}") for i in range(min(n, MAX_CHANNELS))]

    def _startRun(self, kind, start):
        if self._job is not None:
            slicer.util.warningDisplay(_("An IBIX run is in progress: wait for it or press Cancel."),
                                       windowTitle=_("IBIX"))
            return
        try:
            run = start(onProgress=self._onProgress, onDone=self._onRunDone, poll=False)
        except Exception as error:  # bad input: nothing was started, the scene is unchanged
            self._fail(error)
            return
        self._begin(run, kind)

    def _onProgress(self, done, total, stage):
        self.ui.progressBar.setMaximum(max(1, int(total)))
        self.ui.progressBar.setValue(min(int(done), max(1, int(total))))
        self._setStatus(f"{stage} ({done}/{total})")

    def _onRunDone(self, run):
        """A run ended (main thread). The scene may have been closed and the panel hidden meanwhile."""
        p = self._parameterNode
        if run.request.kind == "atlas":
            self._onAtlasDone(run)
            return
        self.ui.statisticsLabel.text = self.statisticsText(run) if run.state == jobs.FINISHED else ""
        if run.state == jobs.FINISHED:
            if p is not None:
                if run.request.kind == "output":
                    p.outputVolume = run.node
                else:
                    p.resultVolume = run.node
            self._setStatus(run.status + " -> '" + run.node.GetName() + "'")
        elif run.state == jobs.CANCELLED:
            self._setStatus(_("Cancelled: {reason}").format(reason=run.error))
        else:
            self._fail(run.error)

    @staticmethod
    def statisticsText(run):
        """The statistics of a finished forward/backward run as a small table (rich text), empty for an output."""
        return IBIXWidget.statisticsTable(run.request.kind, run.statistics)

    @staticmethod
    def statisticsTable(kind, statistics):
        rows = jobs.statistics_rows(kind, statistics)
        if not rows:
            return ""
        labels = statisticLabels()
        cells = "".join(f"<tr><td>{labels.get(key, key)}</td><td>&nbsp;{value}</td></tr>" for key, value in rows)
        return f"<table>{cells}</table>"

    def _displayOptions(self):
        return self.logic.displayOptions(self._parameterNode)

    def onGenerateOutput(self):
        self._startRun(_("generate output"), lambda **kw: self.logic.startGenerateOutput(self._inputNodes(), **kw))

    def onRunForward(self):
        p = self._parameterNode
        self._startRun(_("forward mapping"), lambda **kw: self.logic.startForward(
            self._inputNodes(), p.inputSegmentation, p.inputSegmentId, outputNode=p.outputVolume,
            display=self._displayOptions(), **self.logic.forwardParameters(p), **kw))

    def onRunBackward(self):
        p = self._parameterNode
        self._startRun(_("backward mapping"), lambda **kw: self.logic.startBackward(
            self._inputNodes(), p.outputVolume, p.outputSegmentation, p.outputSegmentId,
            display=self._displayOptions(), **self.logic.backwardParameters(p), **kw))

    # --- live backward map: the response atlas of the input once, then B follows the output segment -------------

    def _atlasKey(self):
        """What an atlas depends on: the model, the input volumes (and their voxels) and the block parameters."""
        p = self._parameterNode
        params = self.logic.atlasParameters(p)
        nodes = self._inputNodes()
        return (self.logic.modelPath, tuple((n.GetID(), n.GetImageData().GetMTime()) for n in nodes if n),
                tuple(sorted(params.items())))

    def onLiveToggled(self, on):
        if not on:
            self.logic.stopLive()
            return
        p = self._parameterNode
        try:
            key = self._atlasKey()
        except Exception as error:
            self.ui.liveBackwardCheckBox.checked = False
            self._fail(error)
            return
        if self._atlas is not None and self._atlas[0] == key:
            self._startLive(self._atlas[1])
            return
        self._pendingAtlasKey = key
        self._startRun(_("response atlas"), lambda **kw: self.logic.startAtlas(
            self._inputNodes(), **self.logic.atlasParameters(p), **kw))
        if self._job is None or getattr(self._job, "request", None) is None or self._job.request.kind != "atlas":
            self.ui.liveBackwardCheckBox.checked = False  # not started (busy or bad input)

    def _onAtlasDone(self, run):
        if run.state == jobs.FINISHED:
            self._atlas = (self._pendingAtlasKey, run.atlas_path)
            self._setStatus(run.status)
            if self.ui.liveBackwardCheckBox.checked:
                self._startLive(run.atlas_path)
            return
        self.ui.liveBackwardCheckBox.checked = False
        if run.state == jobs.CANCELLED:
            self._setStatus(_("Cancelled: {reason}").format(reason=run.error))
        else:
            self._fail(run.error)

    def _startLive(self, atlasPath):
        p = self._parameterNode
        try:
            live = self.logic.startLive(atlasPath, self._inputNodes()[0], p.outputSegmentation, p.outputSegmentId,
                                        normalization=p.normalization, display=self._displayOptions())
        except Exception as error:
            self.ui.liveBackwardCheckBox.checked = False
            self._fail(error)
            return
        if live.error:
            self._setStatus(live.error, error=True)
        else:
            p.resultVolume = live.node
            self._setStatus(_("Live backward map: B follows the output segment as it is painted (no model run)"))

    def onCancel(self):
        if self._job is not None:
            self._job.cancel()
            self._setStatus(_("Cancelling..."))

    def onApplyDisplay(self):
        p = self._parameterNode
        if not p or not p.resultVolume:
            self._fail(ValueError(_("no result map selected: run a forward or backward mapping first")))
            return
        background = slicer.mrmlScene.GetNodeByID(p.resultVolume.GetAttribute("IBIX.background") or "")
        scene.show_overlay(p.resultVolume, background, **self._displayOptions())

    # --- cohort ---------------------------------------------------------------------------------------------

    def onRunCohort(self):
        if self._job is not None:
            slicer.util.warningDisplay(_("An IBIX run is in progress: wait for it or press Cancel."),
                                       windowTitle=_("IBIX"))
            return
        try:
            self.logic._requireModel()
            run = self.logic.startCohort(self.ui.cohortManifestPathLineEdit.currentPath, self.logic.modelPath,
                                         self.ui.cohortOutputPathLineEdit.currentPath,
                                         mapping=self.ui.cohortMappingComboBox.currentText or "forward",
                                         onProgress=self._onProgress, onDone=self._onCohortDone, poll=False)
        except Exception as error:  # bad paths: nothing was started
            self._fail(error)
            return
        self._begin(run, _("cohort"))

    def _onCohortDone(self, run):
        if run.state == jobs.FINISHED:
            self._setStatus(run.status + " -> " + run.files.get("report", ""))
            self._fillCohortCases(run.output_dir)
        elif run.state == jobs.CANCELLED:
            self._setStatus(_("Cancelled: {reason}").format(reason=run.error))
        else:
            self._fail(run.error)

    def onCohortOutputChanged(self, path):
        self._fillCohortCases(path)

    def _fillCohortCases(self, outputDir):
        """List the finished cases of ``outputDir/cohort.csv`` (none when there is no cohort there yet)."""
        try:
            rows = self.logic.cohortCases(outputDir) if outputDir else []
        except (ValueError, OSError):
            rows = []
        self._cohortCases = [row["case"] for row in rows if row.get("status") == "ok"]
        self.ui.cohortCaseComboBox.clear()
        for case in self._cohortCases:
            self.ui.cohortCaseComboBox.addItem(case)
        self._checkCanRun()

    def onOpenCohortCase(self):
        case = self.ui.cohortCaseComboBox.currentText
        try:
            nodes = self.logic.loadCohortCase(self.ui.cohortOutputPathLineEdit.currentPath, case,
                                              display=self._displayOptions())
        except Exception as error:
            self._fail(error)
            return
        shown = nodes[-1]
        if self._parameterNode is not None:
            self._parameterNode.resultVolume = shown
        statistics = json.loads(shown.GetAttribute("IBIX.statistics") or "{}")
        self.ui.statisticsLabel.text = self.statisticsTable(shown.GetAttribute("IBIX.kind"), statistics)
        self._setStatus(_("Opened case {case}: {count} volumes").format(case=case, count=len(nodes)))

    def onEditMask(self, which):
        p = self._parameterNode
        volume = p.inputVolume0 if which == "input" else (p.outputVolume or p.inputVolume0)
        segmentation = p.inputSegmentation if which == "input" else p.outputSegmentation
        if volume is None:
            self._fail(ValueError(_("no volume selected to paint on: select an input volume or generate the output")))
            return
        if segmentation is None:
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"IBIX {which} mask")
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            segmentId = segmentation.GetSegmentation().AddEmptySegment("", f"{which} region")
            selector = self.ui.inputMaskSelector if which == "input" else self.ui.outputMaskSelector
            selector.setCurrentNode(segmentation)
            selector.setCurrentSegmentID(segmentId)
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        if hasattr(editor, "setSourceVolumeNode"):
            editor.setSourceVolumeNode(volume)
        else:  # Slicer < 5.4
            editor.setMasterVolumeNode(volume)


#
# IBIXLogic (console API; no GUI needed)
#

class IBIXLogic(ScriptedLoadableModuleLogic):
    """Console API. Every run computes in a separate Python process (the same runner as the GUI). Example::

        import IBIX
        logic = IBIX.IBIXLogic()
        logic.loadModel("/path/t1_to_t2_cae.onnx")            # runtime="gpu" for an NVIDIA GPU
        t1 = slicer.util.getNode("IBIX-T1")
        seg = slicer.util.getNode("IBIX-T1 input mask")
        sid = seg.GetSegmentation().GetNthSegmentID(0)
        fmap = logic.runForward([t1], seg, sid, n_jitters=8)  # waits; Slicer stays responsive
        run = logic.startForward([t1], seg, sid, onDone=lambda run: print(run.state, run.node))  # returns at once
        print(run.statistics)                                  # once finished: reach95_mm, peak, ...
        files = logic.runCohort("manifest.csv", "/path/t1_to_t2_cae.onnx", "/out", workers=2)  # waits
        nodes = logic.loadCohortCase("/out", "case1")          # the case's input and maps, new nodes
        atlas = logic.runAtlas([t1], n_blocks=500)              # response atlas of the input (waits) -> path
        live = logic.startLive(atlas, t1, outSeg, outSid)      # B follows the output segment as it is painted
        logic.stopLive()

    Synchronous calls raise exceptions (``IBIXLogic.IBIXError``, a ValueError, or ``IBIXLogic.Cancelled``) with
    the text the GUI shows; a failed or cancelled run leaves the scene unchanged.
    """

    def __init__(self, launcher=None, python=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.modelPath = None
        self.modelInfo = None        # card, device and provider reported by the engine process
        self.runtime = "cpu"
        self.launcher = launcher     # how engine processes start (default: slicer.util.launchConsoleProcess)
        self.python = python         # and with which Python (default: PythonSlicer)
        self.prestart = True         # keep an engine process started for the next run (hides its start-up)
        self._standby = None
        self._pollers = []
        self._live = None            # the live backward map (IBIXLib.live.LiveBackward) while it is on
        self._liveNode = None        # its B node, reused when Live is turned on again for the same input

    def getParameterNode(self):
        return IBIXParameterNode(super().getParameterNode())

    # --- dependencies and model ------------------------------------------------------------------------------

    @staticmethod
    def ensureDependencies(runtime="cpu", prompt=True):
        """Install what ``runtime`` ("cpu" or "gpu") needs, after asking; "ready", "installed" or "skipped"."""
        return dependencies.ensure(runtime, prompt=prompt)

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
        """Start the engine process of the next run now (Python and the engine's imports take ~0.5 s)."""
        if self.prestart and self._standby is None and self.modelInfo is not None:
            self._standby = jobs.Standby(self.device(self.runtime), self.launcher, self.python)

    def stopStandby(self):
        """End the engine process kept for the next run (the module does it on exit)."""
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

    # --- parameters ----------------------------------------------------------------------------------------

    @staticmethod
    def forwardParameters(p):
        params = {"n_jitters": int(p.forwardJitters), "signed": bool(p.signedDisplay),
                  "progressive": bool(p.progressive)}
        if p.maxJitter > 0:
            params["max_jitter"] = float(p.maxJitter)
        return params

    @staticmethod
    def backwardParameters(p):
        params = dict(IBIXLogic.atlasParameters(p), normalization=p.normalization, progressive=bool(p.progressive))
        if p.coarseToFine:
            params["coarse_blocks"] = int(p.coarseBlocks)
            params["refine_threshold"] = float(p.refineThreshold)
        return params

    @staticmethod
    def atlasParameters(p):
        """The block and jitter parameters of the backward section that a response atlas takes."""
        params = {"n_blocks": int(p.blocks), "compactness": float(p.compactness),
                  "n_jitters": int(p.backwardJitters)}
        if p.maxJitter > 0:
            params["max_jitter"] = float(p.maxJitter)
        return params

    @staticmethod
    def displayOptions(p):
        if p is None:
            return {}
        return {"opacity": p.opacity, "threshold": p.threshold, "legend": p.showLegend,
                "colormap": None if p.colormap == "Auto" else p.colormap}

    # --- runs: start* return at once (the run is polled by a timer), run* wait for the result ----------------

    def _start(self, request, display=None, onProgress=None, onDone=None, poll=True, runClass=None, **runOptions):
        self._requireModel()

        def done(run):
            self._prestart()
            if onDone is not None:
                onDone(run)

        standby, self._standby = self._standby, None
        run = (runClass or jobs.Run)(request, self.modelPath, device=self.device(self.runtime), display=display,
                                     on_progress=onProgress, on_done=done, launcher=self.launcher,
                                     python=self.python, **runOptions)
        try:
            run.start(standby)
        except Exception:  # refused before it ran (the standby was used up): keep one for the next run
            self._prestart()
            raise
        if poll:
            self._pollers.append(_Poller(run, self._pollers))
        return run

    def startGenerateOutput(self, inputNodes, name=None, **kw):
        """Start generating the output (returns the run at once); ``onDone(run)`` gets the new volume as run.node."""
        request = scene.prepare_request("output", self._requireModel()["channels"], _asList(inputNodes), name=name)
        return self._start(request, **kw)

    def startForward(self, inputNodes, segmentationNode, segmentId, outputNode=None, signed=False, name=None,
                     display=None, onProgress=None, onDone=None, poll=True, **params):
        """Start a forward map F of an input segment (returns the run at once); shown over ``outputNode``."""
        request = scene.prepare_request("forward", self._requireModel()["channels"], _asList(inputNodes),
                                        segmentationNode, segmentId, output_node=outputNode,
                                        display="signed" if signed else "normalized", name=name, **params)
        return self._start(request, display, onProgress, onDone, poll)

    def startBackward(self, inputNodes, outputNode, segmentationNode, segmentId, name=None, display=None,
                      onProgress=None, onDone=None, poll=True, **params):
        """Start a backward map B of an output segment (returns the run at once); shown over the input."""
        request = scene.prepare_request("backward", self._requireModel()["channels"], _asList(inputNodes),
                                        segmentationNode, segmentId, output_node=outputNode, name=name, **params)
        return self._start(request, display, onProgress, onDone, poll)

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
                                       normalization=normalization, display=display, node=previous).start()
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
            self._pollers.append(_Poller(run, self._pollers))
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
    """Polls one run with a Qt timer until it ends (asynchronous console runs)."""

    def __init__(self, run, registry):
        self.run, self.registry = run, registry
        self.timer = qt.QTimer()
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


#
# IBIXTest
#

class IBIXTest(ScriptedLoadableModuleTest):
    """Scene side always; inference on the shipped demo where ONNX Runtime is installed (skipped otherwise)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_scene_side()
        self.setUp()
        self.test_inference()

    def _case(self):
        import numpy as np

        rng = np.random.default_rng(0)
        array = rng.random((6, 24, 20)).astype(np.float32)
        volume = slicer.util.addVolumeFromArray(array, np.diag([0.8, 0.9, 2.5, 1.0]), name="IBIXTest T1")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "IBIXTest mask")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentId = segmentation.GetSegmentation().AddEmptySegment("", "region")
        mask = np.zeros(array.shape, np.uint8)
        mask[3, 8:12, 6:10] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segmentId, volume)
        return array, volume, segmentation, segmentId, mask

    def test_scene_side(self):
        """Segments to masks, a precomputed map to an overlay with the right colours and geometry."""
        import numpy as np

        self.delayDisplay(_("IBIX: scene side (segments to masks, maps to overlays)"))
        array, volume, segmentation, segmentId, mask = self._case()
        request = scene.prepare_request("forward", ["T1"], [volume], segmentation, segmentId, n_jitters=2)
        np.testing.assert_array_equal(request.mask, mask.astype(bool))
        count = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(ValueError):  # an empty segment: refused, scene unchanged
            empty = segmentation.GetSegmentation().AddEmptySegment("", "empty")
            scene.prepare_request("forward", ["T1"], [volume], segmentation, empty)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        fmap = np.zeros(array.shape, np.float32)
        fmap[3, 6:14, 4:12] = np.linspace(0.1, 1.0, 64).reshape(8, 8)
        node = scene.add_result(request, fmap, request.geometry, {})
        np.testing.assert_allclose(slicer.util.arrayFromVolume(node), fmap)
        self.assertTrue(scene.geometry_from_volume_node(node).matches(scene.geometry_from_volume_node(volume)))
        self.assertIn("Inferno", node.GetDisplayNode().GetColorNode().GetName())
        composite = slicer.app.layoutManager().sliceWidget("Red").sliceLogic().GetSliceCompositeNode()
        self.assertEqual(composite.GetForegroundVolumeID(), node.GetID())
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), array)

    def test_inference(self):
        """The shipped T1 demo end to end through the engine process, where ONNX Runtime is installed."""
        if dependencies.installed_runtime() is None:
            self.delayDisplay(_("IBIX: inference skipped: ONNX Runtime is not installed (installs are skipped on "
                                "test machines); the scene side was tested"))
            return
        modelPath = _findResource("Models", "t1_to_t2_cae.onnx")
        sample = _findResource("SampleData", "IBIX-T1.nrrd")
        if modelPath is None or sample is None:
            self.delayDisplay(_("IBIX: inference skipped: the demo model or sample data is not installed"))
            return
        self.delayDisplay(_("IBIX: demo inference in the engine process"))
        array, volume, segmentation, segmentId, mask = self._case()
        logic = IBIXLogic()
        try:
            logic.loadModel(modelPath, installDependencies=False)
            output = logic.generateOutput([volume])
            fmap = logic.runForward([volume], segmentation, segmentId, output, n_jitters=2)
            self.assertGreater(float(slicer.util.arrayFromVolume(fmap).max()), 0.0)
            bmap = logic.runBackward([volume], output, segmentation, segmentId, n_blocks=20, n_jitters=2)
            self.assertEqual(slicer.util.arrayFromVolume(bmap).shape, array.shape)
        finally:
            logic.stopStandby()  # no engine process left waiting after the test
        self.delayDisplay(_("IBIX test passed"))
