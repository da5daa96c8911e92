"""IBIX: Instance-Based Inference eXplainers for image-to-image ONNX generators, as a 3D Slicer module.

The widget is thin: it binds the Qt widgets to ``IBIXLib.controller.Controller``, the state machine that the web
page (``IBIXWeb``) drives too; the controller starts runs through the console logic (``IBIXLogic`` class below,
``IBIXLib.logic``) and polls them with a timer. The engine package is imported as ``ibx``; it runs in a separate
Python process (``IBIXLib.jobs``), so ONNX Runtime is never imported into Slicer itself. ``IBIXLib.scene`` reads the
scene and shows results; ``IBIXLib.dependencies`` installs the Python packages, after asking.
"""
import logging
import os

import qt
import vtk

import slicer
from IBIXLib import controller, dependencies, logic, scene
from IBIXLib.logic import RUNTIMES
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

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
# Parameter node: every setting of IBIX, declared once in IBIXLib.controller (the web page uses the same list)
#

IBIXParameterNode = parameterNodeWrapper(controller.settingsClass("IBIXParameterNode", WithinRange))


#
# IBIXWidget
#

class IBIXWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Module panel. Thin: binds the Qt widgets to an :class:`IBIXLib.controller.Controller` (which starts, polls,
    cancels and finishes runs) and to the parameter node; it copies the controller's state into the widgets."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.controller = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._shownCases = None  # the cohort cases listed in cohortCaseComboBox

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
        self.controller = controller.Controller(self.logic, qt.QTimer(), changed=self.updateGUI, error=self._error,
                                                warning=self._warning, ask=self._ask)
        self.inputSelectors = [getattr(self.ui, f"inputVolumeSelector{i}") for i in range(controller.MAX_CHANNELS)]
        self.inputLabels = [getattr(self.ui, f"inputVolumeLabel{i}") for i in range(controller.MAX_CHANNELS)]

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)

        c, ui = self.controller, self.ui
        ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        ui.runtimeComboBox.connect("currentIndexChanged(int)", self.onRuntimeChanged)
        gpuUnavailable = dependencies.runtime_unavailable("gpu")
        if gpuUnavailable:  # no onnxruntime-gpu wheel for this platform: offer the CPU only, and say why
            ui.runtimeComboBox.removeItem(len(RUNTIMES) - 1)
            ui.runtimeComboBox.toolTip = gpuUnavailable
        ui.loadModelButton.connect("clicked(bool)", self.onLoadModel)
        ui.generateOutputButton.connect("clicked(bool)", lambda: c.generateOutput())
        for selector in (ui.inputMaskSelector, ui.outputMaskSelector):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMaskSelectionChanged)
            selector.connect("currentSegmentChanged(QString)", self.onMaskSelectionChanged)
        ui.editInputMaskButton.connect("clicked(bool)", lambda: self.onEditMask("input"))
        ui.editOutputMaskButton.connect("clicked(bool)", lambda: self.onEditMask("output"))
        ui.normalizationComboBox.connect("currentTextChanged(QString)", self.onComboChanged)
        ui.colormapComboBox.connect("currentTextChanged(QString)", self.onComboChanged)
        ui.runForwardButton.connect("clicked(bool)", lambda: c.runForward())
        ui.runBackwardButton.connect("clicked(bool)", lambda: c.runBackward())
        ui.estimateForwardButton.connect("clicked(bool)", lambda: c.estimateForward())
        ui.estimateBackwardButton.connect("clicked(bool)", lambda: c.estimateBackward())
        ui.liveBackwardCheckBox.connect("toggled(bool)", lambda on: c.setLive(on))
        ui.cancelButton.connect("clicked(bool)", lambda: c.cancel())
        ui.applyDisplayButton.connect("clicked(bool)", lambda: c.applyDisplay())
        ui.runCohortButton.connect("clicked(bool)", lambda: c.runCohort(
            ui.cohortManifestPathLineEdit.currentPath, ui.cohortOutputPathLineEdit.currentPath,
            ui.cohortMappingComboBox.currentText))
        ui.openCohortCaseButton.connect("clicked(bool)", lambda: c.openCohortCase(
            ui.cohortOutputPathLineEdit.currentPath, ui.cohortCaseComboBox.currentText))
        ui.cohortOutputPathLineEdit.connect("currentPathChanged(QString)", c.fillCohortCases)
        self.initializeParameterNode()

    def cleanup(self):
        if self.controller is not None:
            if self.controller.job is not None:
                self.controller.job.cancel()
            self.controller.timer.stop()
        if self.logic is not None:
            self.logic.stopLive()
            self.logic.stopStandby()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        self.controller.sceneClosing()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event):
        """A scene was loaded: its IBIX parameter node (if any) holds the settings; every widget shows them."""
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
            if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified):
                self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self.controller.setParameters(self._parameterNode)

    def onParameterNodeModified(self, caller=None, event=None):
        self.updateGUI()

    # --- the controller's state -> widgets -------------------------------------------------------------------

    def updateGUI(self):
        """Copy the controller's state and the settings the parameter node wrapper does not connect into the
        widgets (signals blocked: nothing here is a user's edit)."""
        c, ui = self.controller, self.ui
        for name, on in c.enabled().items():
            for widget in {"coarse": (ui.coarseBlocksSpinBox, ui.refineThresholdSpinBox),
                           "live": (ui.liveBackwardCheckBox,), "loadModel": (ui.loadModelButton,),
                           "runtime": (ui.runtimeComboBox,),
                           "runForward": (ui.runForwardButton, ui.estimateForwardButton),
                           "runBackward": (ui.runBackwardButton, ui.estimateBackwardButton),
                           }.get(name, (getattr(ui, name + "Button"),)):
                widget.enabled = on
        ui.progressBar.setMaximum(c.progress[1])
        ui.progressBar.setValue(c.progress[0])
        ui.statusLabel.text = c.status
        ui.statusLabel.setStyleSheet("color: #c0392b;" if c.statusError else "")
        ui.cardSummaryLabel.text = c.cardSummary
        ui.deviceLabel.text = c.deviceSummary
        ui.estimateLabel.text = c.estimate
        ui.statisticsLabel.text = self.statisticsTable(c.statisticsRows())
        for i, (label, selector) in enumerate(zip(self.inputLabels, self.inputSelectors)):
            label.visible = selector.visible = i < max(1, len(c.channels))
            label.text = _("{channel} volume:").format(channel=c.channels[i]) if i < len(c.channels) \
                else _("Input volume:")
        p = self._parameterNode
        manual = (ui.liveBackwardCheckBox, ui.cohortCaseComboBox, ui.modelPathLineEdit, ui.inputMaskSelector,
                  ui.outputMaskSelector, ui.normalizationComboBox, ui.colormapComboBox, ui.runtimeComboBox)
        wasBlocked = [w.blockSignals(True) for w in manual]
        ui.liveBackwardCheckBox.checked = c.live
        if c.cohortCases != self._shownCases:
            self._shownCases = list(c.cohortCases)
            ui.cohortCaseComboBox.clear()
            for case in c.cohortCases:
                ui.cohortCaseComboBox.addItem(case)
        if p:
            ui.modelPathLineEdit.currentPath = p.modelPath
            for selector, node, segment in ((ui.inputMaskSelector, p.inputSegmentation, p.inputSegmentId),
                                            (ui.outputMaskSelector, p.outputSegmentation, p.outputSegmentId)):
                selector.setCurrentNode(node)
                if segment:
                    selector.setCurrentSegmentID(segment)
            ui.normalizationComboBox.currentText = p.normalization
            ui.colormapComboBox.currentText = p.colormap
            runtimes = [r for r, _device in RUNTIMES]
            ui.runtimeComboBox.currentIndex = runtimes.index(p.runtime) if p.runtime in runtimes else 0
        for w, b in zip(manual, wasBlocked):
            w.blockSignals(b)

    @staticmethod
    def statisticsTable(rows):
        """The map statistics as a small table (rich text), empty when there are none."""
        cells = "".join(f"<tr><td>{label}</td><td>&nbsp;{value}</td></tr>" for label, value in rows)
        return f"<table>{cells}</table>" if rows else ""

    @staticmethod
    def statisticsText(run):
        """The statistics of a finished forward/backward run as a small table, empty for an output."""
        return IBIXWidget.statisticsTable(controller.statisticsRows(run.request.kind, run.statistics))

    def _error(self, message):
        logging.error("IBIX: " + message)
        slicer.util.errorDisplay(message, windowTitle=_("IBIX"))

    def _warning(self, message):
        slicer.util.warningDisplay(message, windowTitle=_("IBIX"))

    def _ask(self, question):
        self.controller.answer(slicer.util.confirmOkCancelDisplay(question, windowTitle=_("IBIX")))

    # --- widgets -> settings (those the parameter node wrapper does not connect) -----------------------------

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

    def onLoadModel(self):
        p = self._parameterNode
        self.controller.loadModel(self.ui.modelPathLineEdit.currentPath, p.runtime if p else "cpu")

    def onEditMask(self, which):
        p = self._parameterNode
        volume = p.inputVolume0 if which == "input" else (p.outputVolume or p.inputVolume0)
        segmentation = p.inputSegmentation if which == "input" else p.outputSegmentation
        if volume is None:
            self.controller._fail(ValueError(_("no volume selected to paint on: select an input volume or generate "
                                               "the output")))
            return
        if segmentation is None:
            segmentation, _segmentId = self.controller.newMask(which, volume)
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

class IBIXLogic(ScriptedLoadableModuleLogic, logic.Logic):
    __doc__ = logic.Logic.__doc__

    def __init__(self, launcher=None, python=None):
        ScriptedLoadableModuleLogic.__init__(self)
        logic.Logic.__init__(self, launcher, python, timerFactory=qt.QTimer)

    def getParameterNode(self):
        return IBIXParameterNode(super().getParameterNode())

    forwardParameters = staticmethod(controller.forwardParameters)
    backwardParameters = staticmethod(controller.backwardParameters)
    atlasParameters = staticmethod(controller.atlasParameters)
    displayOptions = staticmethod(controller.displayOptions)


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
