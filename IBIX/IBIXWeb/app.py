"""The IBIX page: trame-slicer slice views and segment editor bound to :class:`IBIXLib.controller.Controller`.

The page holds one Slicer scene (``trame_slicer.core.SlicerApp``) with two axial slice views side by side, linked
(same slice, zoom and pan): *Input* shows the input volume, the input mask M^x and B; *Output* shows the generated
output, the output mask M^f and F. Every button calls a controller action; :meth:`Page.refresh` copies the
controller's state into the trame state. All browser tabs connected to one server share this page (one user).
"""
import asyncio
import json
import os
import time
import types

import numpy as np

import IBIXLogic as ibx
import slicer
from IBIXLib import controller, logic, scene

from .files import MODEL_SUFFIXES, VOLUME_SUFFIXES

#: The slice views of the page: layout name -> what it shows.
VIEWS = ("Input", "Output")

#: Where each kind of result is shown (F over the output, B over the input, as in the Slicer module).
SHOWN_IN = {"output": ["Output"], "forward": ["Output"], "backward": ["Input"]}

COLORMAPS = ["Auto", "Inferno", "Viridis", "DivergingBlueRed", "Grey"]


class AsyncTimer:
    """A Qt-like timer (``setInterval``, ``setSingleShot``, ``connect("timeout()", slot)``, ``start``, ``stop``,
    ``isActive``) on the server's asyncio loop: what the controller and the live map poll with."""

    def __init__(self):
        self._interval, self._single, self._slots, self._task = 0.05, False, [], None

    def setInterval(self, ms):
        self._interval = ms / 1000.0

    def setSingleShot(self, single):
        self._single = bool(single)

    def connect(self, signal, slot):
        self._slots.append(slot)

    def isActive(self):
        return self._task is not None

    def start(self):
        if self._task is None:
            self._task = asyncio.get_event_loop().create_task(self._run())

    def stop(self):
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _run(self):
        me = self._task
        while self._task is me:
            await asyncio.sleep(self._interval)
            if self._task is not me:
                break
            if self._single:
                self._task = None
            for slot in list(self._slots):
                slot()
            if self._single:
                break


class Page:
    """One IBIX page on a trame server (see the module docstring).

    Parameters
    ----------
    server : trame_server.Server
    data : IBIXWeb.files.DataFolder
        What the page may read (and write, under its output folder).
    device : {"auto", "cpu", "cuda"}
        Where the engine process runs the model.
    """

    def __init__(self, server, data, device="auto"):
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories
        from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

        self.server, self.state, self.data, self.device = server, server.state, data, device
        self.app = SlicerApp()
        self._install_slicer_globals()
        register_rca_factories(self.app.view_manager, server, slice_view_ui_f=lambda *args: None)
        self.layout_manager = LayoutManager(self.app.scene, self.app.view_manager, server)
        views = [ViewLayoutDefinition.slice_view("Axial", label=name, color=color)
                 for name, color in zip(VIEWS, ("#F34A33", "#EFD64D"))]
        self.layout_manager.register_layout_dict(
            {"IBIX": Layout(LayoutDirection.Horizontal, views, flex_sizes=["1 1 0", "1 1 0"])})
        self.layout_manager.set_layout("IBIX")

        self.logic = logic.Logic(timerFactory=AsyncTimer)
        self.logic.device = lambda runtime: device  # the server's --device, whatever the settings say
        self.controller = controller.Controller(self.logic, AsyncTimer(), changed=self.refresh, error=self._error,
                                                warning=self._error, ask=self._ask)
        self.controller.views = SHOWN_IN
        self.controller.parameters = controller.settings(runtime="gpu" if device == "cuda" else "cpu")
        self._shownResult = None
        self._undo = None
        self._demo = False
        self._setup_state()
        self._link_views()
        self.refresh()

    # --- the scene -------------------------------------------------------------------------------------------

    def _install_slicer_globals(self):
        """``slicer.mrmlScene`` and ``slicer.modules.*.logic()`` as the Slicer application sets them (what
        ``slicer.util`` and ``IBIXLib.scene`` use), for this page's scene."""
        colors = slicer.vtkSlicerColorLogic()
        colors.SetMRMLApplicationLogic(self.app.app_logic)
        colors.SetMRMLScene(self.app.scene)
        logics = {"colors": colors, "volumes": self.app.volumes_logic, "segmentations": self.app.segmentations_logic}
        slicer.mrmlScene = self.app.scene
        slicer.modules = types.SimpleNamespace(**{name: types.SimpleNamespace(logic=(lambda lg=lg: lg))
                                                  for name, lg in logics.items()})

    def slice_view(self, name):
        return self.app.view_manager.get_view(name)

    def _link_views(self):
        """The two views show the same slice (the output lies on the input grid); a view that gets a new size (the
        browser's layout) fits both views to their volumes again."""
        views = [self.slice_view(name) for name in VIEWS]
        sizes, busy = {}, []

        def follow(source, _event):
            if busy:
                return
            busy.append(1)
            try:
                if any(sizes.get(v.get_singleton_tag()) != tuple(v._view_node.GetDimensions()[:2]) for v in views):
                    sizes.update({v.get_singleton_tag(): tuple(v._view_node.GetDimensions()[:2]) for v in views})
                    self.fit_views()
                matrix = [source.GetSliceToRAS().GetElement(r, c) for r in range(4) for c in range(4)]
                for other in (v._view_node for v in views):
                    if other is not source and matrix != [other.GetSliceToRAS().GetElement(r, c)
                                                          for r in range(4) for c in range(4)]:
                        other.GetSliceToRAS().DeepCopy(source.GetSliceToRAS())
                        other.UpdateMatrices()
            finally:
                busy.clear()
            with self.state:
                self.state.view_geometry = self.view_geometry()

        for view in views:
            view._view_node.AddObserver("ModifiedEvent", follow)

    def fit_views(self):
        """Each view fitted to its volume at its present size (same grid, same size: the same zoom)."""
        for name in VIEWS:
            view = self.slice_view(name)
            view._logic.FitSliceToBackground(True)
            view._logic.SnapSliceOffsetToIJK()
            view.schedule_render()

    def volume_node(self, name, array, geometry):
        return scene.create_volume_node(array, geometry, name, scene=self.app.scene)

    def load_inputs(self, names):
        """Read the chosen volumes (one per model channel) into the scene; new empty input and output masks."""
        p = self.controller.parameters
        nodes = []
        for i, name in enumerate(names):
            array, geometry = ibx.read_volume(str(self.data.resolve(name)))
            if array.ndim != 3:
                raise ibx.InputError(f"{name}: a volume needs three dimensions, got shape {array.shape}")
            nodes.append(self.volume_node(os.path.basename(name).split(".")[0], array, geometry))
            setattr(p, f"inputVolume{i}", nodes[-1])
        p.outputVolume = None
        for which, view in (("input", "Input"), ("output", "Output")):
            segmentation, _segment = self.controller.newMask(which, nodes[0])
            view_node = self.slice_view(view)._view_node
            segmentation.GetDisplayNode().SetViewNodeIDs([view_node.GetID()])
            segmentation.GetSegmentation().GetNthSegment(0).SetColor(*((0.0, 0.9, 0.9) if which == "input"
                                                                       else (0.95, 0.1, 0.1)))
        scene.show_volume(nodes[0])
        for composite in scene._slice_composite_nodes(self.app.scene):
            composite.SetForegroundVolumeID(None)
        for name in VIEWS:
            self.slice_view(name).reset_view()
        self.set_paint(self.state.paint_target or "input")

    # --- painting (trame-slicer's segment editor) -----------------------------------------------------------

    def set_paint(self, target, effect=None):
        """Paint (or erase) the input mask M^x on the input or the output mask M^f on the output."""
        from trame_slicer.segmentation import (BrushDiameterMode, SegmentationEffectErase, SegmentationEffectNoTool,
                                               SegmentationEffectPaint)
        from undo_stack import UndoStack

        p, editor = self.controller.parameters, self.app.segmentation_editor
        segmentation = p.inputSegmentation if target == "input" else p.outputSegmentation
        volume = p.inputVolume0 if target == "input" else (p.outputVolume or p.inputVolume0)
        if segmentation is None or volume is None:
            return
        if self._undo is None:
            self._undo = UndoStack(undo_limit=20)
            editor.set_undo_stack(self._undo)
        if editor.active_segmentation_node is not segmentation or editor.active_volume_node is not volume:
            editor.set_active_segmentation(segmentation, volume)
            editor.set_surface_representation_enabled(False)
        effect = effect or self.state.paint_effect
        kind = {"paint": SegmentationEffectPaint, "erase": SegmentationEffectErase}.get(effect,
                                                                                      SegmentationEffectNoTool)
        active = editor.set_active_effect_type(kind)
        if hasattr(active, "set_brush_diameter"):
            active.set_brush_diameter(float(self.state.brush_size), BrushDiameterMode.ScreenRelative)

    def undo(self):
        if self._undo is not None and self._undo.can_undo():
            self._undo.undo()

    # --- state <-> controller --------------------------------------------------------------------------------

    def _setup_state(self):
        s = self.state
        p = self.controller.parameters
        s.update(dict(
            models=self.data.listing(MODEL_SUFFIXES), model="", volumes=self.volume_files(), inputs=[""],
            card="", device_summary="", channels=[], status="", status_error=False, progress=[0, 1], estimate="",
            statistics=[], question="", enabled={}, live=False, error="", show_error=False, downloads=[],
            paint_target="input", paint_effect="paint", brush_size=6.0, busy_seconds=0.0, view_geometry={},
            n_forward=p.forwardJitters, n_backward=p.backwardJitters, blocks=p.blocks, compactness=p.compactness,
            normalization=p.normalization, signed=p.signedDisplay, progressive=p.progressive,
            coarse=p.coarseToFine, coarse_blocks=p.coarseBlocks, opacity=p.opacity, threshold=p.threshold,
            colormap=p.colormap, legend=p.showLegend, colormaps=COLORMAPS, upload_limit_mb=self.data.upload_limit >> 20,
        ))
        for key in ("n_forward", "n_backward", "blocks", "compactness", "normalization", "signed", "progressive",
                    "coarse", "coarse_blocks", "opacity", "threshold", "colormap", "legend"):
            s.change(key)(self._settings_changed)
        s.change("paint_target", "paint_effect", "brush_size")(self._paint_changed)
        s.change("live")(self._live_changed)

    def volume_files(self):
        uploads = self.data.output / "uploads"
        uploaded = sorted(f"uploads/{f.name}" for f in uploads.iterdir()) if uploads.is_dir() else []
        return self.data.listing(VOLUME_SUFFIXES) + [u for u in uploaded if u.endswith(VOLUME_SUFFIXES)]

    def _settings_changed(self, **_):
        s, p = self.state, self.controller.parameters
        p.forwardJitters, p.backwardJitters = int(s.n_forward), int(s.n_backward)
        p.blocks, p.compactness, p.normalization = int(s.blocks), float(s.compactness), s.normalization
        p.signedDisplay, p.progressive, p.coarseToFine = bool(s.signed), bool(s.progressive), bool(s.coarse)
        p.coarseBlocks, p.opacity, p.threshold = int(s.coarse_blocks), float(s.opacity), float(s.threshold)
        p.colormap, p.showLegend = s.colormap, bool(s.legend)
        self.refresh()

    def _paint_changed(self, paint_target, paint_effect, **_):
        self.set_paint(paint_target, paint_effect)

    def _live_changed(self, live, **_):
        if bool(live) != self.controller.live:
            self.controller.setLive(bool(live))

    def refresh(self):
        """The controller's state -> the page (the controller's ``changed``)."""
        c = self.controller
        with self.state:
            self.state.update(dict(
                card=c.cardSummary, device_summary=c.deviceSummary, channels=c.channels, status=c.status,
                status_error=c.statusError, progress=list(c.progress), estimate=c.estimate,
                statistics=[list(row) for row in c.statisticsRows()], question=c.question, enabled=c.enabled(),
                live=c.live, busy_seconds=round(time.perf_counter() - c._started, 1) if c.job else 0.0))
            if len(self.state.inputs) != max(1, len(c.channels)):
                self.state.inputs = (list(self.state.inputs) + [""] * 4)[:max(1, len(c.channels))]
            if self._demo and c.job is None and self.logic.modelInfo is not None:
                self._demo = False  # the demo's model is checked: its output next
                c.generateOutput()
            if c.result is not None and c.result is not self._shownResult:
                self._shownResult = c.result
                self._save_result(c.result)
                if c.result.request.kind == "output":
                    self.fit_views()

    def view_geometry(self):
        """Each view's size and XY-to-RAS matrix (pixels of its frame -> patient mm), for scripted checks."""
        out = {}
        for name in VIEWS:
            node = self.slice_view(name)._view_node
            m = node.GetXYToRAS()
            out[name] = {"size": list(node.GetDimensions()[:2]),
                         "xy_to_ras": [m.GetElement(r, c) for r in range(4) for c in range(4)]}
        return out

    def _save_result(self, run):
        """A finished run's map (or output) and its summary.json, for download from the output folder."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = f"{stamp}-{run.request.kind}"
        array = slicer.util.arrayFromVolume(run.node)
        path = self.data.writable("results", base + ".nrrd")
        ibx.write_volume(str(path), np.asarray(array), scene.geometry_from_volume_node(run.node))
        summary = self.data.writable("results", base + "-summary.json")
        summary.write_text(json.dumps(run.summary or {}, indent=1))
        self.state.downloads = [*self.state.downloads, {"name": path.name}, {"name": summary.name}]

    def _error(self, message):
        with self.state:
            self.state.error, self.state.show_error = message, True

    def _ask(self, question):
        with self.state:
            self.state.question = question

    # --- actions ---------------------------------------------------------------------------------------------

    def load_model(self):
        self.controller.loadModel(str(self.data.resolve(self.state.model)) if self.state.model else "",
                                  "gpu" if self.device == "cuda" else "cpu")

    def load_inputs_action(self):
        try:
            self.load_inputs([name for name in self.state.inputs if name] or [""])
        except ibx.IBIXError as error:
            self.controller._fail(error)
        self.refresh()

    def run(self, action):
        getattr(self.controller, action)()

    def answer(self, yes):
        self.controller.answer(bool(yes))

    def upload(self, files):
        """Uploaded volume or model files (size limit) -> the output folder; the lists are refreshed."""
        from trame.app.file_upload import ClientFile

        for entry in files or []:
            upload = ClientFile(entry)
            try:
                self.data.save_upload(upload.name, upload.content)
            except ibx.IBIXError as error:
                self._error(str(error))
        with self.state:
            self.state.volumes = self.volume_files()

    def cancel_if_nobody_left(self, clients):
        """A closed page (its last tab) cancels its run."""
        if clients == 0 and self.controller.job is not None:
            self.controller.cancel()

    # --- the demo --------------------------------------------------------------------------------------------

    def open_demo(self, model, volume):
        """The T1 demo ready to paint: the T1 loaded with empty masks, the model checked, then the output made."""
        self.state.model, self.state.inputs = model, [volume]
        self.load_inputs([volume])
        self._demo = True
        self.load_model()

    # --- the UI ----------------------------------------------------------------------------------------------

    def build_ui(self, title="IBIX"):
        from trame.widgets import client, html
        from trame.widgets import vuetify3 as v
        from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout

        self.state.trame__title = title
        with SinglePageWithDrawerLayout(self.server) as layout:
            layout.title.set_text("IBIX - explain an image-to-image model")
            layout.drawer.width = 380
            with layout.toolbar:
                v.VSpacer()
                html.Div("{{ device_summary }}", classes="text-caption mr-4", id="device")
            with layout.drawer, html.Div(classes="pa-2 text-body-2", style="overflow-y: auto"):
                self._model_ui(v, html)
                self._mask_ui(v, html)
                self._run_ui(v, html)
                self._display_ui(v, html)
            client.Style(".layout-grid-container > div, .layout-grid-item { min-width: 0; min-height: 0; }")
            with layout.content:
                with html.Div(style="height: calc(100vh - 92px); display: flex; flex-direction: column"):
                    with html.Div(classes="d-flex", style="flex: 0 0 auto"):
                        html.Div("Input: M^x (cyan) and B", classes="flex-1-1 text-center text-caption")
                        html.Div("Output: M^f (red) and F", classes="flex-1-1 text-center text-caption")
                    with html.Div(style="flex: 1 1 auto; position: relative", id="views"):
                        self.layout_manager.initialize_layout_grid(layout)
            with v.VDialog(model_value=("question.length > 0",), persistent=True, max_width=520):
                with v.VCard(id="question"):
                    v.VCardTitle("Start this run?")
                    v.VCardText("{{ question }}", style="white-space: pre-line")
                    with v.VCardActions():
                        v.VBtn("Run it", id="question-yes", click=(self.answer, "[true]"))
                        v.VBtn("Not now", id="question-no", click=(self.answer, "[false]"))
            with v.VSnackbar(v_model=("show_error",), timeout=-1, color="error", id="error", multi_line=True):
                html.Div("{{ error }}")
                with v.Template(v_slot_actions=True):
                    v.VBtn("Close", click="show_error = false")
        return layout

    def _model_ui(self, v, html):
        html.Div("1. Model and input", classes="text-subtitle-2 mt-1")
        v.VSelect(label="Model (.onnx, card beside it)", items=("models",), v_model=("model",), density="compact",
                  hide_details=True, id="model")
        v.VBtn("Load model", click=self.load_model, disabled=("!enabled.loadModel",), block=True, size="small",
               classes="my-1", id="load-model")
        html.Div("{{ card }}", classes="text-caption", id="card")
        with html.Div(v_for="(name, i) in inputs", key="i"):
            v.VSelect(label=("channels[i] ? channels[i] + ' volume' : 'Input volume'",), items=("volumes",),
                      v_model=("inputs[i]",), density="compact", hide_details=True, classes="mt-1")
        v.VFileInput(label=("`Upload a volume or model (at most ${upload_limit_mb} MiB)`",), multiple=True,
                     density="compact", hide_details=True, classes="mt-1",
                     update_modelValue=(self.upload, "[$event]"))
        with html.Div(classes="d-flex ga-1 my-1"):
            v.VBtn("Load input", click=self.load_inputs_action, disabled=("!enabled.loadModel",), size="small",
                   id="load-input")
            v.VBtn("Generate output", click=(self.run, "['generateOutput']"), disabled=("!enabled.generateOutput",),
                   size="small", id="generate-output")

    def _mask_ui(self, v, html):
        html.Div("2. Masks (paint in the views)", classes="text-subtitle-2 mt-2")
        with v.VBtnToggle(v_model=("paint_target",), mandatory=True, density="compact", divided=True):
            v.VBtn("M^x on the input", value="input", size="small", id="paint-input")
            v.VBtn("M^f on the output", value="output", size="small", id="paint-output")
        with html.Div(classes="d-flex align-center ga-1 mt-1"):
            with v.VBtnToggle(v_model=("paint_effect",), density="compact", divided=True):
                v.VBtn(icon="mdi-brush", value="paint", size="small", id="effect-paint")
                v.VBtn(icon="mdi-eraser", value="erase", size="small", id="effect-erase")
                v.VBtn(icon="mdi-cursor-default", value="none", size="small", id="effect-none")
            v.VBtn(icon="mdi-undo", click=self.undo, size="small", variant="text", id="undo")
            v.VBtn(icon="mdi-fit-to-page-outline", click=self.fit_views, size="small", variant="text", id="fit-views")
        v.VSlider(label="Brush %", v_model=("brush_size",), min=1, max=20, step=1, density="compact",
                  hide_details=True, thumb_label=True)

    def _run_ui(self, v, html):
        html.Div("3. Parameters and run", classes="text-subtitle-2 mt-2")
        with html.Div(classes="d-flex ga-1"):
            v.VTextField(label="N forward", v_model_number=("n_forward",), type="number", density="compact",
                         hide_details=True)
            v.VTextField(label="N backward", v_model_number=("n_backward",), type="number", density="compact",
                         hide_details=True)
            v.VTextField(label="K blocks", v_model_number=("blocks",), type="number", density="compact",
                         hide_details=True)
        with html.Div(classes="d-flex ga-1 mt-1"):
            v.VSelect(label="B normalisation", items=("['fraction', 'magnitude']",), v_model=("normalization",),
                      density="compact", hide_details=True)
            v.VCheckbox(label="signed F", v_model=("signed",), density="compact", hide_details=True)
        with html.Div(classes="d-flex ga-1"):
            v.VCheckbox(label="coarse-to-fine", v_model=("coarse",), density="compact", hide_details=True)
            v.VCheckbox(label="progressive", v_model=("progressive",), density="compact", hide_details=True)
        with html.Div(classes="d-flex ga-1 mt-1"):
            v.VBtn("Run forward", click=(self.run, "['runForward']"), disabled=("!enabled.runForward",),
                   color="primary", size="small", id="run-forward")
            v.VBtn("Estimate", click=(self.run, "['estimateForward']"), disabled=("!enabled.runForward",),
                   size="small", variant="outlined", id="estimate-forward")
        with html.Div(classes="d-flex ga-1 mt-1"):
            v.VBtn("Run backward", click=(self.run, "['runBackward']"), disabled=("!enabled.runBackward",),
                   color="primary", size="small", id="run-backward")
            v.VBtn("Estimate", click=(self.run, "['estimateBackward']"), disabled=("!enabled.runBackward",),
                   size="small", variant="outlined", id="estimate-backward")
        v.VCheckbox(label="Live backward map (response atlas once, then B follows M^f)", v_model=("live",),
                    disabled=("!enabled.live",), density="compact", hide_details=True, id="live")
        v.VBtn("Cancel", click=(self.run, "['cancel']"), disabled=("!enabled.cancel",), size="small",
               color="error", variant="outlined", id="cancel")
        v.VProgressLinear(model_value=("100 * progress[0] / Math.max(1, progress[1])",),
                          indeterminate=("progress[1] === 0",), height=6, classes="my-1", id="progress")
        html.Div("{{ status }}", classes=("status_error ? 'text-error text-caption' : 'text-caption'",),
                 id="status", style="white-space: pre-line")
        html.Div("{{ estimate }}", classes="text-caption text-medium-emphasis", id="estimate")
        with html.Table(classes="text-caption", id="statistics"):
            with html.Tr(v_for="row in statistics"):
                html.Td("{{ row[0] }}")
                html.Td("{{ row[1] }}", classes="pl-2")
        with html.Div(v_if="downloads.length", classes="text-caption mt-1", id="downloads"):
            html.Span("Download: ")
            html.A("{{ d.name }} ", v_for="d in downloads", href=("`ibix-download/${d.name}`",),
                   download=True, classes="mr-1")

    def _display_ui(self, v, html):
        html.Div("4. Display", classes="text-subtitle-2 mt-2")
        v.VSelect(label="Colour map", items=("colormaps",), v_model=("colormap",), density="compact",
                  hide_details=True)
        v.VSlider(label="Opacity", v_model=("opacity",), min=0, max=1, step=0.05, density="compact",
                  hide_details=True)
        v.VSlider(label="Threshold", v_model=("threshold",), min=0, max=1, step=0.01, density="compact",
                  hide_details=True)
        with html.Div(classes="d-flex ga-1"):
            v.VCheckbox(label="legend", v_model=("legend",), density="compact", hide_details=True)
            v.VBtn("Apply display", click=(self.run, "['applyDisplay']"), size="small", id="apply-display")
