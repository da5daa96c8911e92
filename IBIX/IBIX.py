"""IBIX: Instance-Based Inference eXplainers for image-to-image ONNX generators, as a 3D Slicer module.

The widget is thin: every action calls the console logic (``IBIXLogic`` class below), which calls the MRML
bridge ``IBIXLogic.mrml`` and the engine package ``IBIXLogic``. Neither ONNX Runtime nor the engine is
imported when this file is imported; they are imported on first use, after the user agreed to install
missing Python packages.
"""
import logging
import os
import threading
import time
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

#: Largest number of input channels the GUI offers selectors for.
MAX_CHANNELS = 4

HOMEPAGE = "https://github.com/ibix-project/SlicerIBIX"


def _engine():
    """The IBIX engine package (imported on first use)."""
    import importlib

    return importlib.import_module("IBIXLogic")


def _bridge():
    """The MRML bridge ``IBIXLogic.mrml`` (imported on first use)."""
    import importlib

    return importlib.import_module("IBIXLogic.mrml")


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


#
# IBIX
#

class IBIX(ScriptedLoadableModule):
    """Module description (Slicer scripted module)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "IBIX"
        self.parent.categories = ["Image Synthesis"]
        self.parent.dependencies = []
        self.parent.contributors = ["IBIX contributors"]
        self.parent.helpText = f"""
Explain an image-to-image generator (ONNX model with an IBIX model card), e.g. MRI T1 to T2 or MRI to pseudo-CT.
<b>Forward map F</b>: paint an input region; F shows which output voxels react to it.
<b>Backward map B</b>: paint an output region; B shows which input regions drive it.
See the <a href="{HOMEPAGE}">documentation</a>.
"""
        self.parent.acknowledgementText = """
IBIX was developed by the IBIX contributors. Demo models are trained on synthetic data and are not for clinical use.
"""
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data (local files shipped with the extension)
#

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
        ("IBIX T1 brain", ["IBIX-T1.nrrd", "IBIX-T1-input-mask.nrrd", "IBIX-T1-output-mask.nrrd"],
         ["IBIX-T1", "IBIX-T1 input mask", "IBIX-T1 output mask"],
         ["VolumeFile", "SegmentationFile", "SegmentationFile"]),
        ("IBIX pelvis (Dixon MRI + CT)",
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
        try:
            # file:// URIs: Sample Data copies them into its cache and loads them like downloads.
            SampleData.SampleDataLogic.registerCustomSampleDataSource(
                category="IBIX", sampleName=sampleName, thumbnailFileName=icon,
                uris=uris(names), fileNames=names, nodeNames=[nodeNames[i] for i in present],
                loadFileTypes=[fileTypes[i] for i in present])
        except TypeError:  # Slicer releases whose argument is loadFileType
            SampleData.SampleDataLogic.registerCustomSampleDataSource(
                category="IBIX", sampleName=sampleName, thumbnailFileName=icon,
                uris=uris(names), fileNames=names, nodeNames=[nodeNames[i] for i in present],
                loadFileType=[fileTypes[i] for i in present])


#
# Python dependencies (installed on first use, after asking)
#

def hasNvidiaGpu():
    """True where an NVIDIA driver answers (``nvidia-smi -L`` returns 0)."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if not exe:
        return False
    try:
        return subprocess.run([exe, "-L"], capture_output=True, timeout=15).returncode == 0
    except Exception:
        return False


def _installedDistributions(*names):
    from importlib import metadata

    found = []
    for name in names:
        try:
            metadata.distribution(name)
            found.append(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def missingRequirements():
    """(ONNX Runtime package to install or None, other requirement strings missing)."""
    import importlib.util

    onnxPackage = None
    if importlib.util.find_spec("onnxruntime") is None:
        onnxPackage = "onnxruntime-gpu" if hasNvidiaGpu() else "onnxruntime"
    others = []
    for module, requirement in (("skimage", "scikit-image>=0.22"), ("jsonschema", "jsonschema>=4.18"),
                                ("SimpleITK", "SimpleITK"), ("scipy", "scipy")):
        if importlib.util.find_spec(module) is None:
            others.append(requirement)
    return onnxPackage, others


def ensureDependencies(prompt=True):
    """Install what IBIX needs, after asking. Raises RuntimeError when the user declines or pip fails.

    ONNX Runtime: ``onnxruntime-gpu`` where an NVIDIA GPU is present, ``onnxruntime`` otherwise, never both
    (the other flavour is uninstalled first). Asks first (``confirmOkCancelDisplay``), then uninstalls the other
    flavour and installs with ``slicer.pydeps.pip_ensure`` / ``slicer.packaging.pip_ensure`` where the Slicer
    release has it (5.11+), else ``slicer.util.pip_install``.
    """
    onnxPackage, others = missingRequirements()
    if onnxPackage is None and not others:
        return False
    requirements = ([f"{onnxPackage}>=1.17"] if onnxPackage else []) + others
    other = None
    if onnxPackage:
        other = "onnxruntime" if onnxPackage == "onnxruntime-gpu" else "onnxruntime-gpu"
        other = other if _installedDistributions(other) else None
    text = ("IBIX needs these Python packages, which are not installed yet:\n\n  "
            + "\n  ".join(requirements)
            + (f"\n\n{other} will be uninstalled first (the two ONNX Runtime packages cannot coexist)."
               if other else "")
            + "\n\nInstall them now? (This can take a few minutes; Slicer may stop responding meanwhile.)")
    if prompt and not slicer.util.confirmOkCancelDisplay(text, "IBIX: install Python packages"):
        raise RuntimeError("IBIX cannot run without " + ", ".join(requirements)
                           + ": install them (accept the prompt, or run slicer.util.pip_install(...))")
    if other:  # only after consent
        slicer.util.pip_uninstall(other)
    pipEnsure = None
    for moduleName in ("slicer.pydeps", "slicer.packaging"):  # Slicer >= 5.11
        try:
            import importlib

            pipEnsure = getattr(importlib.import_module(moduleName), "pip_ensure", None)
        except ImportError:
            pipEnsure = None
        if pipEnsure is not None:
            break
    if pipEnsure is not None:
        from packaging.requirements import Requirement

        pipEnsure([Requirement(r) for r in requirements], prompt_install=False, requester="IBIX")
    else:
        slicer.util.pip_install(" ".join(requirements))
    onnxPackage, others = missingRequirements()
    if onnxPackage or others:
        raise RuntimeError("IBIX could not install " + ", ".join(([onnxPackage] if onnxPackage else []) + others)
                           + ": install them from the Python console with slicer.util.pip_install(...)")
    return True


#
# Parameter node
#

@parameterNodeWrapper
class IBIXParameterNode:
    """Every setting of the IBIX module (saved with the scene)."""

    modelPath: str = ""
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
    """Module panel. Thin: reads the GUI, calls IBIXLogic, shows results and errors."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._thread = None
        self._cancel = None
        self._progress = (0, 1, "")
        self._error = None
        self._jobDone = False
        self._jobStart = 0.0
        self._timer = None

    # --- setup ---------------------------------------------------------------------------------------------

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/IBIX.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = IBIXLogic()

        self.inputSelectors = [getattr(self.ui, f"inputVolumeSelector{i}") for i in range(MAX_CHANNELS)]
        self.inputLabels = [getattr(self.ui, f"inputVolumeLabel{i}") for i in range(MAX_CHANNELS)]

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
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
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.applyDisplayButton.connect("clicked(bool)", self.onApplyDisplay)

        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self.onPoll)

        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setValue(0)
        self.showChannels([])
        self.initializeParameterNode()

    def cleanup(self):
        if self._cancel is not None:
            self._cancel.set()
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
        if self._cancel is not None:
            self._cancel.set()
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
        wasBlocked = [w.blockSignals(True) for w in (self.ui.modelPathLineEdit, self.ui.inputMaskSelector,
                                                      self.ui.outputMaskSelector, self.ui.normalizationComboBox,
                                                      self.ui.colormapComboBox)]
        self.ui.modelPathLineEdit.currentPath = p.modelPath
        self.ui.inputMaskSelector.setCurrentNode(p.inputSegmentation)
        if p.inputSegmentId:
            self.ui.inputMaskSelector.setCurrentSegmentID(p.inputSegmentId)
        self.ui.outputMaskSelector.setCurrentNode(p.outputSegmentation)
        if p.outputSegmentId:
            self.ui.outputMaskSelector.setCurrentSegmentID(p.outputSegmentId)
        self.ui.normalizationComboBox.currentText = p.normalization
        self.ui.colormapComboBox.currentText = p.colormap
        for w, b in zip((self.ui.modelPathLineEdit, self.ui.inputMaskSelector, self.ui.outputMaskSelector,
                         self.ui.normalizationComboBox, self.ui.colormapComboBox), wasBlocked):
            w.blockSignals(b)

    def onModelPathChanged(self, path):
        if self._parameterNode:
            self._parameterNode.modelPath = path

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
            label.text = f"{channels[i]} volume:" if i < len(channels) else "Input volume:"

    def _checkCanRun(self, caller=None, event=None):
        busy = self._thread is not None
        p = self._parameterNode
        hasModel = self.logic.model is not None
        self.ui.generateOutputButton.enabled = hasModel and not busy
        self.ui.runForwardButton.enabled = hasModel and not busy and bool(p and p.inputSegmentation)
        self.ui.runBackwardButton.enabled = hasModel and not busy and bool(p and p.outputSegmentation)
        self.ui.cancelButton.enabled = busy
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
        slicer.util.errorDisplay(message, windowTitle="IBIX")

    def onLoadModel(self):
        path = self.ui.modelPathLineEdit.currentPath
        try:
            with slicer.util.WaitCursor():
                model = self.logic.loadModel(path)
        except Exception as error:
            self.ui.cardSummaryLabel.text = str(error)
            self.ui.deviceLabel.text = ""
            self.showChannels([])
            self._fail(error)
            self._checkCanRun()
            return
        self.ui.cardSummaryLabel.text = self.logic.cardSummary()
        self.ui.deviceLabel.text = self.logic.deviceSummary()
        self.showChannels(list(model.card.input.channels))
        self._setStatus(f"Model loaded: {model.card.name or os.path.basename(path)}")
        self._checkCanRun()

    def _inputNodes(self):
        n = len(self.logic.model.card.input.channels) if self.logic.model else 1
        return [getattr(self._parameterNode, f"inputVolume{i}") for i in range(min(n, MAX_CHANNELS))]

    def _start(self, makeJob, kind):
        if self._thread is not None:
            slicer.util.warningDisplay("An IBIX run is already in progress: wait for it or press Cancel.",
                                       windowTitle="IBIX")
            return
        try:
            job = makeJob()  # main thread: reads MRML, validates; the scene is not changed
        except Exception as error:
            self._fail(error)
            return
        self._job = job
        self._cancel = threading.Event()
        self._error = None
        self._jobDone = False
        self._progress = (0, 1, "starting")
        self._jobStart = time.time()

        def work():
            try:
                job.compute(progress=self._onProgress, cancel=self._cancel)
            except BaseException as error:  # reported on the main thread
                self._error = error
            finally:
                self._jobDone = True

        job.watch_scene()  # closing the scene cancels the run
        self._thread = threading.Thread(target=work, name=f"IBIX {kind}", daemon=True)
        self._setStatus(f"Running {kind}...")
        self.ui.progressBar.setValue(0)
        self._checkCanRun()
        self._thread.start()
        self._timer.start()

    def _onProgress(self, done, total, message=""):
        # Worker thread: only store; the timer copies it to the GUI.
        self._progress = (done, total, message)

    def onPoll(self):
        done, total, message = self._progress
        self.ui.progressBar.setMaximum(max(1, int(total)))
        self.ui.progressBar.setValue(min(int(done), max(1, int(total))))
        elapsed = time.time() - self._jobStart
        if not self._jobDone:
            self._setStatus(f"{message or 'running'} ({done}/{total}, {elapsed:.0f} s)")
            self._job.show_preview(**self._displayOptions())  # main thread: the latest preview map, if new
            return
        self._timer.stop()
        self._thread.join()
        self._thread = None
        job, error = self._job, self._error
        self._job = None
        engine = _engine()
        job.unwatch_scene()
        job.remove_preview()
        if isinstance(error, engine.Cancelled):
            self._setStatus("Cancelled; the scene was not changed.")
        elif error is not None:
            self._fail(error)
        else:
            try:
                node = self.logic.finishJob(job, **self._displayOptions())
            except Exception as finishError:
                self._fail(finishError)
            else:
                if job.kind == "output":
                    self._parameterNode.outputVolume = node
                else:
                    self._parameterNode.resultVolume = node
                    used = (getattr(job.result, "parameters", {}) or {}).get("max_jitter")
                    if used is not None:
                        self.ui.autoMaxJitterLabel.text = f"used: {used}"
                self._setStatus(job.status + f" -> '{node.GetName()}'")
        self._checkCanRun()

    def _displayOptions(self):
        p = self._parameterNode
        return {"opacity": p.opacity, "threshold": p.threshold, "legend": p.showLegend,
                "colormap": None if p.colormap == "Auto" else p.colormap}

    def onGenerateOutput(self):
        self._start(lambda: self.logic.prepareGenerate(self._inputNodes()), "generate output")

    def onRunForward(self):
        p = self._parameterNode
        self._start(lambda: self.logic.prepareForward(
            self._inputNodes(), p.inputSegmentation, p.inputSegmentId, **self.logic.forwardParameters(p)),
            "forward mapping")

    def onRunBackward(self):
        p = self._parameterNode
        self._start(lambda: self.logic.prepareBackward(
            self._inputNodes(), p.outputVolume, p.outputSegmentation, p.outputSegmentId,
            **self.logic.backwardParameters(p)), "backward mapping")

    def onCancel(self):
        if self._cancel is not None:
            self._cancel.set()
            self._setStatus("Cancelling...")

    def onApplyDisplay(self):
        p = self._parameterNode
        if not p.resultVolume:
            self._fail(ValueError("no result map selected: run a forward or backward mapping first"))
            return
        background = slicer.mrmlScene.GetNodeByID(p.resultVolume.GetAttribute("IBIX.reference") or "")
        _bridge().show_overlay(p.resultVolume, background, **self._displayOptions())

    def onEditMask(self, which):
        p = self._parameterNode
        volume = p.inputVolume0 if which == "input" else (p.outputVolume or p.inputVolume0)
        segmentation = p.inputSegmentation if which == "input" else p.outputSegmentation
        if volume is None:
            self._fail(ValueError(f"no {'input' if which == 'input' else 'output'} volume selected: select or "
                                  "generate a volume to paint on"))
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
    """Console API. Example::

        import IBIX
        logic = IBIX.IBIXLogic()
        logic.loadModel("/path/t1_to_t2_cae.onnx")
        t1 = slicer.util.getNode("IBIX-T1")
        seg = slicer.util.getNode("IBIX-T1 input mask")
        fmap = logic.runForward([t1], seg, seg.GetSegmentation().GetNthSegmentID(0), n_jitters=8)

    Errors raise exceptions (``IBIXLogic.IBIXError``, a ValueError) with the text the GUI shows; a failed or
    cancelled run leaves the scene unchanged.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.model = None
        self.modelPath = None

    def getParameterNode(self):
        return IBIXParameterNode(super().getParameterNode())

    # --- model ---------------------------------------------------------------------------------------------

    def loadModel(self, path, card=None, device="auto", installDependencies=True):
        """Load an ONNX model and its card (``<model>.json``). Returns the engine model."""
        if not path:
            raise ValueError("no model selected: choose an ONNX model file (.onnx with its .json model card)")
        if not os.path.isfile(path):
            raise ValueError(f"model file not found: {path}: choose an existing .onnx file")
        if installDependencies:
            ensureDependencies()
        self.model = None
        self.model = _engine().load_model(path, card=card, device=device)
        self.modelPath = path
        return self.model

    def _requireModel(self):
        if self.model is None:
            raise ValueError("no model loaded: call loadModel(path) (GUI: choose the ONNX file, Load model)")
        return self.model

    def cardSummary(self, model=None):
        model = model or self._requireModel()
        card = model.card
        channels = ", ".join(card.input.channels)
        units = getattr(card.output, "units", None) or "?"
        dims = f"{card.spatial_dims}D" + (f" ({card.slice_axis} slices)" if card.spatial_dims == 2 else "")
        name = card.name or os.path.basename(self.modelPath or "")
        return f"{name}: {len(card.input.channels)} channel(s) [{channels}], {dims}, output units {units}"

    def deviceSummary(self, model=None):
        model = model or self._requireModel()
        return f"{model.device} ({getattr(model, 'provider', '')})"

    # --- parameters ----------------------------------------------------------------------------------------

    @staticmethod
    def forwardParameters(p):
        params = {"n_jitters": int(p.forwardJitters), "display": "signed" if p.signedDisplay else "normalized",
                  "progressive": bool(p.progressive)}
        if p.maxJitter > 0:
            params["max_jitter"] = float(p.maxJitter)
        return params

    @staticmethod
    def backwardParameters(p):
        params = {"n_blocks": int(p.blocks), "compactness": float(p.compactness),
                  "n_jitters": int(p.backwardJitters), "normalization": p.normalization,
                  "progressive": bool(p.progressive)}
        if p.maxJitter > 0:
            params["max_jitter"] = float(p.maxJitter)
        if p.coarseToFine:
            params["coarse_blocks"] = int(p.coarseBlocks)
            params["refine_threshold"] = float(p.refineThreshold)
        return params

    # --- three-step runs (used by the GUI to compute in a worker thread) -----------------------------------

    def prepareGenerate(self, inputNodes):
        return _bridge().prepare_generate(self._requireModel(), inputNodes)

    def prepareForward(self, inputNodes, segmentationNode, segmentId, **params):
        return _bridge().prepare_forward(self._requireModel(), inputNodes, segmentationNode, segmentId, **params)

    def prepareBackward(self, inputNodes, outputNode, segmentationNode, segmentId, **params):
        return _bridge().prepare_backward(self._requireModel(), inputNodes, segmentationNode, segmentId,
                                          output_node=outputNode, **params)

    @staticmethod
    def finishJob(job, **display):
        return job.finish(**display)

    # --- one-call runs (console) ---------------------------------------------------------------------------

    def generateOutput(self, inputNodes, name=None):
        """Run the model -> NEW volume node with the generated output."""
        return _bridge().generate_output(self._requireModel(), _asList(inputNodes), name=name)

    def runForward(self, inputNodes, segmentationNode, segmentId, progress=None, cancel=None, **params):
        """Forward map F of an input segment -> NEW volume node (``display="signed"`` for signed F)."""
        return _bridge().run_forward(self._requireModel(), _asList(inputNodes), segmentationNode, segmentId,
                                     progress=progress, cancel=cancel, **params)

    def runBackward(self, inputNodes, outputNode, segmentationNode, segmentId, progress=None, cancel=None,
                    **params):
        """Backward map B of an output segment -> NEW volume node on the input grid."""
        return _bridge().run_backward(self._requireModel(), _asList(inputNodes), segmentationNode, segmentId,
                                      output_node=outputNode, progress=progress, cancel=cancel, **params)


def _asList(nodes):
    if nodes is None:
        return []
    return list(nodes) if isinstance(nodes, (list, tuple)) else [nodes]


#
# IBIXTest
#

class IBIXTest(ScriptedLoadableModuleTest):
    """Runs the console flow inside Slicer: model -> output -> forward and backward maps."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_IBIX_flow()

    def _model(self):
        """An identity ONNX model built with onnx, or the shipped demo model."""
        import tempfile

        try:
            import json

            import onnx
            from onnx import TensorProto, helper
        except ImportError:
            path = _findResource("Models", "t1_to_t2_cae.onnx")
            self.assertIsNotNone(path, "no onnx package and no shipped demo model")
            return path
        directory = tempfile.mkdtemp(prefix="IBIXTest")
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, "H", "W"])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        path = os.path.join(directory, "identity.onnx")
        onnx.save(model, path)
        card = {"ibix_card": 1, "name": "identity", "spatial_dims": 2, "slice_axis": "axial",
                "input": {"name": "x", "layout": "NCHW", "channels": ["T1"]},
                "output": {"name": "y", "layout": "NCHW", "channels": ["T2"], "units": "a.u."}}
        with open(os.path.join(directory, "identity.json"), "w") as f:
            json.dump(card, f)
        return path

    def test_IBIX_flow(self):
        import numpy as np

        self.delayDisplay("IBIX: building inputs")
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

        logic = IBIXLogic()
        logic.loadModel(self._model())
        before = slicer.mrmlScene.GetNumberOfNodes()
        output = logic.generateOutput([volume])
        self.assertEqual(slicer.util.arrayFromVolume(output).shape, array.shape)
        fmap = logic.runForward([volume], segmentation, segmentId, n_jitters=2)
        values = slicer.util.arrayFromVolume(fmap)
        self.assertEqual(values.shape, array.shape)
        self.assertGreater(float(values.max()), 0.0)
        self.assertEqual(fmap.GetAttribute("IBIX.kind"), "forward")
        bmap = logic.runBackward([volume], output, segmentation, segmentId, n_blocks=20, n_jitters=2)
        self.assertEqual(slicer.util.arrayFromVolume(bmap).shape, array.shape)
        self.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), before)

        self.delayDisplay("IBIX: errors leave the scene unchanged")
        empty = segmentation.GetSegmentation().AddEmptySegment("", "empty")
        count = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(ValueError):
            logic.runForward([volume], segmentation, empty)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), array)
        self.delayDisplay("IBIX test passed")
