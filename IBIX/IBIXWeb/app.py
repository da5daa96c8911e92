"""The IBIX page: trame-slicer slice views and segment editor bound to :class:`IBIXLib.controller.Controller`.

The page holds one Slicer scene (``trame_slicer.core.SlicerApp``) with two axial slice views side by side, linked
(same slice, zoom and pan): *Input* shows the input volume, the input mask M^x and B; *Output* shows the generated
output, the output mask M^f and F. Every button calls a controller action; :meth:`Page.refresh` copies the
controller's state into the trame state. All browser tabs connected to one server share this page (one user).
"""
import asyncio
import contextlib
import json
import os
import time
import traceback
import types

import numpy as np

import IBIXLogic as ibx
import slicer
from IBIXLib import controller, jobs, logic, scene

from .files import MODEL_SUFFIXES, VOLUME_SUFFIXES

#: The slice views of the page: layout name -> what it shows.
VIEWS = ("Input", "Output")

#: Where each kind of result is shown (F over the output, B over the input, as in the Slicer module).
SHOWN_IN = {"output": ["Output"], "forward": ["Output"], "backward": ["Input"]}

#: Seconds after a run's result is shown before the other views render and its download files are written: the
#: result's frame is rendered, encoded and sent first.
AFTER_RESULT_S = 0.3

COLORMAPS = ["Auto", "Inferno", "Viridis", "DivergingBlueRed", "Grey"]


class AsyncTimer:
    """A Qt-like timer (``setInterval``, ``setSingleShot``, ``connect("timeout()", slot)``, ``start``, ``stop``,
    ``isActive``) on the server's asyncio loop: what the controller and the live map poll with. ``around``: a
    context manager factory entered around each timeout."""

    def __init__(self, around=contextlib.nullcontext):
        self._interval, self._single, self._slots, self._task = 0.05, False, [], None
        self._around = around

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
            with self._around():
                for slot in list(self._slots):
                    try:
                        slot()
                    except Exception:  # as a Qt timer: the error is printed and the timer goes on
                        traceback.print_exc()
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
        # one frame per change at the still quality (90): no second, sharper render of every frame half a second later
        register_rca_factories(self.app.view_manager, server, slice_view_ui_f=lambda *args: None,
                               interactive_quality=90)
        self.layout_manager = LayoutManager(self.app.scene, self.app.view_manager, server)
        views = [ViewLayoutDefinition.slice_view("Axial", label=name, color=color)
                 for name, color in zip(VIEWS, ("#F34A33", "#EFD64D"))]
        self.layout_manager.register_layout_dict(
            {"IBIX": Layout(LayoutDirection.Horizontal, views, flex_sizes=["1 1 0", "1 1 0"])})
        self.layout_manager.set_layout("IBIX")
        for name in VIEWS:  # no multisampling, as in Slicer's slice views: 8 samples made each frame ~10x slower
            self.slice_view(name).render_window().SetMultiSamples(0)  # on Mesa's CPU renderer (0.3 s -> 0.03 s)

        jobs.READ_IN_THREAD = True  # no PythonQt here: a worker thread reads each map while the engine exits
        self.logic = logic.Logic(timerFactory=AsyncTimer)
        self.logic.device = lambda runtime: device  # the server's --device, whatever the settings say
        self._held = []  # views whose frames wait until a run's result is shown
        self.controller = controller.Controller(self.logic, AsyncTimer(around=self._result_views_first),
                                                changed=self.refresh, error=self._error,
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

    @contextlib.contextmanager
    def _result_views_first(self):
        """Around each poll of the controller: once a run is about to end, the views that do not show its result
        hold their frames until it is shown, so that the result's frame is rendered and sent first (every view
        re-renders when a node is added, and a frame takes tens of ms on a CPU renderer); then they render."""
        job = self.controller.job
        if getattr(job, "finishing", False) and not self._held:
            shown = SHOWN_IN.get(job.request.kind, VIEWS)
            others = [self.slice_view(name) for name in VIEWS if name not in shown]
            self._held = [view for view in others if not view.set_render_blocked(True)]
        try:
            yield
        finally:
            if self._held and self.controller.job is not job:  # ended: the others render once its frame is out
                held, self._held = self._held, []
                self._after_result_frame(self._release, held)

    @staticmethod
    def _release(views):
        for view in views:
            view.set_render_blocked(False)  # renders it

    @staticmethod
    def _after_result_frame(callback, *args):
        """``callback(*args)`` AFTER_RESULT_S from now (at once where no server loop runs)."""
        try:
            asyncio.get_running_loop().call_later(AFTER_RESULT_S, callback, *args)
        except RuntimeError:
            callback(*args)

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
        """Read the chosen volumes (one per model channel) into the scene; new empty input and output masks (the
        previous input's masks and live map go)."""
        p = self.controller.parameters
        read = []
        for name in names:
            array, geometry = ibx.read_volume(str(self.data.resolve(name)))
            if array.ndim != 3:
                raise ibx.InputError(f"{name}: a volume needs three dimensions, got shape {array.shape}")
            read.append((os.path.basename(name).split(".")[0], array, geometry))
        if self.controller.live:
            self.controller.setLive(False)
        previous = [node for node in (p.inputSegmentation, p.outputSegmentation) if node is not None]
        nodes = [self.volume_node(*volume) for volume in read]
        for i, node in enumerate(nodes):
            setattr(p, f"inputVolume{i}", node)
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
        for node in previous:  # once the editor holds the new masks
            self.app.scene.RemoveNode(node)

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
        models, volumes = self.files()
        s.update(dict(
            models=models, model="", volumes=volumes, inputs=[""],
            card="", device_summary="", channels=[], status="", status_error=False, progress=[0, 1], estimate="",
            statistics=[], question="", enabled={}, live=False, error="", show_error=False, downloads=[],
            paint_target="input", paint_effect="paint", brush_size=6.0, busy_seconds=0.0, view_geometry={},
            run_timings={},
            n_forward=p.forwardJitters, n_backward=p.backwardJitters, blocks=p.blocks, compactness=p.compactness,
            normalization=p.normalization, signed=p.signedDisplay, progressive=p.progressive,
            coarse=p.coarseToFine, coarse_blocks=p.coarseBlocks, opacity=p.opacity, threshold=p.threshold,
            colormap=p.colormap, legend=p.showLegend, colormaps=COLORMAPS, upload_limit=self.data.upload_limit,
        ))
        for key in ("n_forward", "n_backward", "blocks", "compactness", "normalization", "signed", "progressive",
                    "coarse", "coarse_blocks", "opacity", "threshold", "colormap", "legend"):
            s.change(key)(self._settings_changed)
        s.change("paint_target", "paint_effect", "brush_size")(self._paint_changed)
        s.change("live")(self._live_changed)

    def files(self):
        """(models, volumes): the data folder's files of each kind, then the uploaded ones (``uploads/NAME``); the
        data folder is walked once."""
        uploads = self.data.output / "uploads"
        uploaded = sorted(f"uploads/{f.name}" for f in uploads.iterdir()) if uploads.is_dir() else []
        found = self.data.listing(MODEL_SUFFIXES + VOLUME_SUFFIXES) + uploaded
        return tuple([f for f in found if f.lower().endswith(suffixes)]
                     for suffixes in (MODEL_SUFFIXES, VOLUME_SUFFIXES))

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
                self.state.run_timings = self.run_timings(c.result)
                self._after_result_frame(self._save_result, c.result)
                if c.result.request.kind == "output":
                    self.fit_views()

    @staticmethod
    def run_timings(run):
        """Where a finished run's time went, in seconds (for scripted checks and the README's figures): writing
        its inputs, the engine process's wall time (job handed over -> its final record), the engine's own
        ``seconds_total`` (its summary), the wait for the process's end, and the result into a shown node."""
        t = run.timings
        return {"write_inputs": round(t["handed"] - t["started"], 3),
                "engine_wall": round(t["engine_finished"] - t["handed"], 3),
                "engine_total": float((run.summary or {}).get("seconds_total") or 0.0),
                "exit_seen": round(t["exited"] - t["engine_finished"], 3),
                "read_and_show": round(t["added"] - t["exited"], 3),
                "started_to_shown": round(t["added"] - t["started"], 3)}

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
        """A finished run's map (or output) and its summary.json, for download from the output folder.

        Called once the result's frame is out; the files are written in a worker thread (compressing a volume takes
        ~0.1 s; SimpleITK lets go of the GIL); the download links appear once they are complete."""
        base = f"{time.strftime('%Y%m%d-%H%M%S')}-{run.request.kind}"
        array = np.array(slicer.util.arrayFromVolume(run.node))  # a copy: the node may leave the scene meanwhile
        geometry = scene.geometry_from_volume_node(run.node)
        summary = json.dumps(run.summary or {}, indent=1)
        path = self.data.writable("results", base + ".nrrd")
        summary_path = self.data.writable("results", base + "-summary.json")

        def write():  # each file whole or not at all; the summary last
            ibx.write_volume(str(path), array, geometry)
            partial = summary_path.with_name(summary_path.name + ".partial")
            partial.write_text(summary)
            os.replace(partial, summary_path)

        def written(error=None):
            if error is not None:
                self._error(f"could not write the result for download: {error}")
                return
            with self.state:
                self.state.downloads = [*self.state.downloads, {"name": path.name}, {"name": summary_path.name}]

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no server loop (scripted use): write now
            write()
            written()
            return
        loop.run_in_executor(None, write).add_done_callback(lambda future: written(future.exception()))

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
        names = [name for name in self.state.inputs if name] or [""]
        try:
            self.load_inputs(names)
        except ibx.IBIXError as error:
            self.controller._fail(error)
            return
        shape = " x ".join(str(n) for n in slicer.util.arrayFromVolume(self.controller.parameters.inputVolume0).shape)
        self.controller.report(f"Input loaded: {', '.join(names)} ({shape} voxels); paint M^x on the input")

    def run(self, action):
        getattr(self.controller, action)()

    def answer(self, yes):
        self.controller.answer(bool(yes))

    def upload(self, files):
        """Uploaded volume or model files (a model's card beside it) -> the output folder; the lists are refreshed.
        A file over the size limit is refused: the browser sends only its name and size."""
        from trame.app.file_upload import ClientFile

        for entry in files or []:
            upload = ClientFile(entry)
            try:
                self.data.save_upload(upload.name, upload.content, upload.size)
            except ibx.IBIXError as error:
                self._error(str(error))
        with self.state:
            self.state.models, self.state.volumes = self.files()

    def cancel_if_nobody_left(self, clients):
        """A closed page (its last tab) cancels its run."""
        if clients == 0 and self.controller.job is not None:
            self.controller.cancel()

    def close(self):
        """The server stops: a run in flight is cancelled (its folder removed), the live map and the engine
        process kept for the next run end; no engine process outlives the page."""
        job = self.controller.job
        if job is not None:
            job.cancel()
            jobs.wait(job)  # the killed child is reaped and the job folder removed
        self.logic.stopLive()
        self.logic.stopStandby()

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
            # an element of a list: set, then sent to the server (trame sends a variable when it is reassigned)
            v.VSelect(label=("channels[i] ? channels[i] + ' volume' : 'Input volume'",), items=("volumes",),
                      model_value=("inputs[i]",), update_modelValue="inputs[i] = $event; flushState('inputs')",
                      density="compact", hide_details=True, classes="mt-1", id=("`input-${i}`",))
        v.VFileInput(label=("`Upload volumes, or a model and its card (at most ${upload_limit / 2**20} MiB)`",),
                     multiple=True, density="compact", hide_details=True, classes="mt-1", id="upload",
                     update_modelValue=(self.upload, "[[].concat($event || []).map(f => f.size > upload_limit ? "
                                                     "{name: f.name, size: f.size} : f)]"))
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
                         hide_details=True, id="n-backward")
            v.VTextField(label="K blocks", v_model_number=("blocks",), type="number", density="compact",
                         hide_details=True, id="n-blocks")
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
