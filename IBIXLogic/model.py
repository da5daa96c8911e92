"""ONNX Runtime sessions and devices: run a model card's pipeline on batches, in memory-sized chunks.

:mod:`IBIXLogic.pipeline` turns volumes into model inputs and back; this module owns the ONNX Runtime session
(cached per file), the device (CUDA or CPU, I/O binding), batching within a memory budget, out-of-memory
retries, cancellation and the evaluation counters.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .card import ModelCard, read_card, resolve_card
from .checks import check_arguments
from .errors import Cancelled, ModelError, is_file
from .geometry import Geometry
from .model_file import check_external_data
from .pipeline import Pipeline, PreparedInput
from .windows import blend

log = logging.getLogger("IBIX")

#: Default memory budget for one batch of model inputs and their activations on the CPU (bytes).
DEFAULT_MEMORY_BUDGET = 512 * 2**20
#: Share of the GPU's free memory (when the model is loaded) that one batch may take by default.
GPU_MEMORY_SHARE = 0.5
#: On the CPU, voxels per model call from which ONNX Runtime runs at its full speed (Testing/benchmarks/
#: benchmark_batches.py): on this project's models (2D autoencoder and U-Net, small 3D encoder-decoder), from 16^2 to
#: 256^2 pixels and 8^3 to 48^3 voxels, the time per voxel comes within 10 % of its best between 2,000 and 32,000
#: voxels per call and gains nothing beyond (it can rise once activations leave the processor's caches). Larger CPU
#: batches only take memory.
CPU_BATCH_VOXELS = 2**15
#: Activations per input value assumed when sizing batches (a small generator keeps ~16-64 feature maps).
ACTIVATION_FACTOR = 48
#: Largest batch IBIX sends at once; larger batches stop paying off on CPUs and small GPUs.
MAX_BATCH = 64
#: Largest sample (voxels) the load-time check runs.
CHECK_VOXELS = 4_000_000
#: Relative change of a sample's output beside another sample beyond which a model counts as mixing samples
#: (ONNX Runtime's batched kernels differ from single-sample ones by rounding only).
BATCH_TOLERANCE = 1e-4
#: Largest difference between two runs of the same input, relative to the largest output, that counts as the
#: device's float rounding: ONNX Runtime's CPU kernels repeat bit for bit; CUDA kernels with atomic additions or a
#: different algorithm choice may differ in the last bits.
DETERMINISM_TOLERANCE = {"cpu": 1e-5, "cuda": 1e-4}
#: Operators whose outputs are random (Dropout only in training mode).
RANDOM_OPERATORS = ("Dropout", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli",
                    "Multinomial")
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}

ProgressCallback = Callable[[int, int, str], None]


def check_cancel(cancel: Any) -> None:
    """Raise Cancelled when ``cancel`` (an Event-like object or a callable) says so."""
    if cancel is None:
        return
    stop = cancel.is_set() if hasattr(cancel, "is_set") else cancel()
    if stop:
        raise Cancelled("the run was cancelled; nothing was written")




def _is_out_of_memory(message: str) -> bool:
    """Whether an ONNX Runtime error message says that memory ran out."""
    return "alloc" in message.lower() or "memory" in message.lower()


class _DeviceBuffers:
    """ONNX Runtime I/O binding with buffers that stay on the model's device from batch to batch.

    For each batch shape, one input buffer and one output buffer live on the device (``"cuda"`` or ``"cpu"``) and
    are bound once; a batch is copied into the input buffer, the model writes into the output buffer, and the
    result is copied back once. The buffers of the last few shapes are kept (tiles come in a few shapes).
    """

    KEEP = 4

    def __init__(self, input_name: str, output_name: str, device: str):
        self.input_name, self.output_name, self.device = input_name, output_name, device
        self._bindings: "OrderedDict[tuple, tuple[Any, Any]]" = OrderedDict()

    def run(self, session: Any, batch: np.ndarray) -> np.ndarray:
        key = (id(session), batch.shape, batch.dtype.str)
        entry = self._bindings.get(key)
        if entry is None:
            value = _onnxruntime().OrtValue.ortvalue_from_shape_and_type(batch.shape, batch.dtype, self.device, 0)
            value.update_inplace(batch)
            binding = session.io_binding()
            binding.bind_ortvalue_input(self.input_name, value)
            binding.bind_output(self.output_name, self.device, 0)
            session.run_with_iobinding(binding)
            # from now on the model writes into the output it allocated for this shape
            binding.bind_ortvalue_output(self.output_name, binding.get_outputs()[0])
            self._bindings[key] = (value, binding)
            while len(self._bindings) > self.KEEP:
                self._bindings.popitem(last=False)
        else:
            value, binding = entry
            self._bindings.move_to_end(key)
            value.update_inplace(batch)
            session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


class _NonFiniteOutput(ModelError):
    """The model returned NaN or infinite values."""


class Model:
    """An ONNX image-to-image model with its card; see :func:`load_model`."""

    def __init__(self, session: Any, card: ModelCard, path: Path, device: str,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET):
        self.session = session
        self.card = card
        self.path = path
        self.device = device
        self.provider = session.get_providers()[0]
        self.memory_budget = int(memory_budget)
        self.evaluations = 0  # samples (images or volumes, whatever their size) run through the model
        self.evaluated_voxels = 0  # voxels of those samples as the model saw them (padded)
        self.pipeline = Pipeline(card, _NUMPY_TYPES[next(a.type for a in session.get_inputs()
                                                         if a.name == card.input.name)])
        #: run through ONNX Runtime's I/O binding, with input and output buffers kept on the model's device
        #: (on by default with CUDA, where it saves an allocation and a staging copy per batch)
        self.io_binding = device == "cuda"
        self._bound = _DeviceBuffers(card.input.name, card.output.name, device)
        #: each model call takes one sample: set by :meth:`check_runs` when the model mixes the samples of a batch
        #: (a sample's output depends on the others, as with batch statistics), so that no map depends on which
        #: jittered copies shared a call
        self.one_sample_per_call = False

    def __repr__(self) -> str:
        return (f"Model({self.path.name!r}, {self.card.spatial_dims}D, channels={list(self.card.input.channels)}, "
                f"device={self.device!r})")

    @property
    def n_channels(self) -> int:
        return len(self.card.input.channels)

    # -- input handling -----------------------------------------------------------------------------------
    def prepare(self, x: Any, geometry: Geometry | None = None) -> PreparedInput:
        """Cut ``x`` into model samples and fix the intensity mapping from the unperturbed input."""
        return self.pipeline.prepare(x, geometry)

    def batch_size(self, sample_shape: Sequence[int]) -> int:
        """How many samples go through the model at once (the model's fixed batch, or the memory budget; with
        sliding windows, as many samples as their windows fit)."""
        patch = self.card.input.patch
        if patch is None:
            return self.capacity(sample_shape)
        return max(1, self.capacity(patch.size) // len(self.pipeline.windows(sample_shape)))

    def capacity(self, shape: Sequence[int]) -> int:
        """How many images of ``shape`` go through the model at once: the model's fixed batch; else as many as the
        memory budget holds, and on the CPU no more than reach full speed (:data:`CPU_BATCH_VOXELS` voxels)."""
        if self.card.fixed_batch:
            return self.card.fixed_batch
        voxels = int(np.prod(self.pipeline.model_shape(shape)))
        per_image = voxels * (self.n_channels + 1) * 4 * ACTIVATION_FACTOR
        by_memory = int(max(1, min(MAX_BATCH, self.memory_budget // max(per_image, 1))))
        if self.device == "cpu":
            return min(by_memory, max(1, -(-CPU_BATCH_VOXELS // max(voxels, 1))))
        return by_memory

    # -- running ------------------------------------------------------------------------------------------
    def _session_run(self, batch: np.ndarray) -> np.ndarray:
        """The model's raw outputs for ``batch``, in calls of the model's fixed batch size (the last call filled
        with copies of its last sample), or of one sample each when the model mixes samples."""
        fixed = self.card.fixed_batch
        n = batch.shape[0]
        step = 1 if self.one_sample_per_call else fixed or n
        outputs = []
        for start in range(0, n, step):
            chunk = batch[start:start + step]
            if fixed and len(chunk) < fixed:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - len(chunk), axis=0)])
            outputs.append(self._call(chunk)[:min(step, n - start)])
        return np.concatenate(outputs) if len(outputs) > 1 else outputs[0]

    def _call(self, chunk: np.ndarray) -> np.ndarray:
        """One ONNX Runtime call (through the device buffers with I/O binding)."""
        if self.io_binding:
            try:
                return self._bound.run(self.session, chunk)
            except Exception as exc:  # ONNX Runtime raises its own exception types
                if _is_out_of_memory(str(exc)):
                    raise
                # a binding the device refuses is no reason to stop: plain runs give the same outputs
                log.warning("ONNX Runtime I/O binding failed on %s (%s); running without it", self.device,
                            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
                self.io_binding = False
        return self.session.run([self.card.output.name], {self.card.input.name: chunk})[0]

    def run(self, batch: np.ndarray, prepared: PreparedInput,
            describe: Callable[[int], str] | None = None) -> np.ndarray:
        """Model outputs (output units) for a batch of samples in input units.

        ``batch`` has shape (n, channels, *sample_shape) and is overwritten. ``describe(i)`` names sample i in
        the error raised when the model returns NaN or infinite values. With sliding windows (``input.patch``)
        each sample is padded to hold a window, cut into windows, and the windows' outputs are blended.
        """
        batch = prepared.normalize(batch)
        if self.card.input.patch is None:
            return self.run_model_units(batch, describe)
        pipeline, sample_shape = self.pipeline, batch.shape[2:]
        plan, widths = pipeline.windows(sample_shape), pipeline.padding(sample_shape)
        padded = pipeline.pad(batch, widths)
        parts = np.stack([padded[(i, slice(None)) + w] for i in range(len(batch)) for w in plan])
        outputs = self.run_windows(parts, None if describe is None else
                                   lambda j: f"{describe(j // len(plan))}, window {j % len(plan) + 1} of {len(plan)}")
        weights = pipeline.importance_map()
        crop = tuple(slice(before, before + n) for (before, _), n in zip(widths, sample_shape))
        return np.stack([blend(outputs[i * len(plan):(i + 1) * len(plan)], plan, padded.shape[2:], weights)[crop]
                         for i in range(len(batch))])

    def run_windows(self, parts: np.ndarray, describe: Callable[[int], str] | None = None) -> np.ndarray:
        """Outputs (output units) for windows of padded samples in model units, (n, channels, *patch_size), as
        many at a time as the batch size allows."""
        step = self.capacity(parts.shape[2:])
        outputs = [self.run_model_units(parts[a:a + step], None if describe is None else
                                        (lambda j, a=a: describe(a + j)))
                   for a in range(0, len(parts), step)]
        return np.concatenate(outputs) if len(outputs) > 1 else outputs[0]

    def run_model_units(self, batch: np.ndarray, describe: Callable[[int], str] | None = None) -> np.ndarray:
        """Outputs (output units) for images already in model units, (n, channels, *shape): padded to the shape
        the model takes, run, cropped back to ``shape``."""
        sample_shape = batch.shape[2:]
        model_input = self.pipeline.layout(batch)
        try:
            raw = self._session_run(model_input)
        except Exception as exc:  # ONNX Runtime raises its own exception types
            text = str(exc)
            if _is_out_of_memory(text):
                raise MemoryError(text) from None
            first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            raise ModelError(f"{self.path.name}: ONNX Runtime failed on an input of shape "
                             f"{list(model_input.shape)}: {first}") from None
        self.evaluations += batch.shape[0]
        self.evaluated_voxels += batch.shape[0] * int(np.prod(self.pipeline.model_shape(sample_shape)))
        out = self.pipeline.from_model(np.asarray(raw), sample_shape, batch.shape[0])
        finite = np.isfinite(out).reshape(out.shape[0], -1).all(axis=1)
        if not finite.all():
            failed = np.flatnonzero(~finite)
            named = [describe(int(i)) if describe else f"sample {int(i)} of the batch" for i in failed[:8]]
            more = f" and {len(failed) - 8} more" if len(failed) > 8 else ""
            raise _NonFiniteOutput(
                f"the model produced NaN or infinite values for {'; '.join(named)}{more} ({len(failed)} of the "
                f"{len(finite)} inputs of this model call): check the model on this input, "
                "or lower the maximum jitter H if only perturbed inputs fail")
        return out

    def run_chunked(self, make_batch: Callable[[int, int], np.ndarray], total: int, prepared: PreparedInput,
                    describe: Callable[[int], str] | None = None, per_item: int = 1,
                    cancel: Any = None, max_items: int | None = None,
                    sample_shape: Sequence[int] | None = None):
        """Yield (start, stop, outputs) over ``total`` items, each ``per_item`` samples, in memory-sized chunks.

        ``make_batch(start, stop)`` builds the input batch for items start..stop-1. A chunk that runs out of
        memory is retried in halves; an item larger than the memory budget allows, or that runs out of memory, is
        run a few samples at a time.
        ``sample_shape`` sizes the batches when the samples are not ``prepared``'s (e.g. tiles of them).
        """
        capacity = self.batch_size(sample_shape or prepared.sample_shape)
        items = max(1, capacity // per_item)
        if max_items is not None:
            items = min(items, max_items)
        # samples per model call when one item holds more samples than fit at once (e.g. 2N jitters of a volume)
        piece = capacity if capacity < per_item else None
        start = 0
        while start < total:
            check_cancel(cancel)
            stop = min(total, start + items)
            describe_chunk = None if describe is None else (lambda i, s=start: describe(s * per_item + i))
            try:
                if piece is None:
                    out = self.run(make_batch(start, stop), prepared, describe_chunk)
                else:
                    out, piece = self._run_in_pieces(make_batch(start, stop), prepared, describe_chunk, piece,
                                                     cancel)
            except MemoryError as exc:
                if stop - start > 1:
                    items = max(1, (stop - start) // 2)
                    log.warning("out of memory with %d items per batch; retrying with %d", stop - start, items)
                elif per_item > 1:
                    piece = max(1, per_item // 2)
                    log.warning("out of memory with one item (%d samples); retrying %d samples at a time",
                                per_item, piece)
                else:
                    raise self._out_of_memory(prepared, exc) from None
                continue
            yield start, stop, out
            start = stop

    def _run_in_pieces(self, batch: np.ndarray, prepared: PreparedInput, describe: Callable[[int], str] | None,
                       piece: int, cancel: Any) -> tuple[np.ndarray, int]:
        """Run ``batch`` ``piece`` samples at a time, halving ``piece`` on out-of-memory; (outputs, piece)."""
        outputs, start = [], 0
        while start < batch.shape[0]:
            check_cancel(cancel)
            stop = min(batch.shape[0], start + piece)
            try:
                outputs.append(self.run(batch[start:stop].copy(), prepared,
                                        None if describe is None else (lambda i, s=start: describe(s + i))))
            except MemoryError as exc:
                if piece == 1:
                    raise self._out_of_memory(prepared, exc) from None
                piece = max(1, piece // 2)
                log.warning("out of memory; retrying %d samples at a time", piece)
                continue
            start = stop
        return np.concatenate(outputs), piece

    @staticmethod
    def _out_of_memory(prepared: PreparedInput, exc: BaseException) -> ModelError:
        return ModelError(f"out of memory running one sample of {list(prepared.sample_shape)} voxels ({exc}); "
                          "use a smaller volume, a smaller model, or the CPU")

    def _check_inputs(self, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray, str]:
        """Two different smooth inputs (channels, *shape) in model units for :meth:`check_runs`, and what they are.

        Values lie in the middle half of the card's input intensity range (its ``to``), or in [0.25, 0.75]
        without one: positive and moderate, so that models such as log(x) or 1/x are checked where they are
        defined.
        """
        target = self.card.input.intensity.target if self.card.input.intensity.kind != "identity" else (0.0, 1.0)
        low = min(target) + 0.25 * abs(target[1] - target[0])
        high = max(target) - 0.25 * abs(target[1] - target[0])
        grids = np.meshgrid(*[np.linspace(0.0, 1.0, n) for n in shape], indexing="ij")
        ramp = sum(grids) / len(grids)
        wave = 0.5 + 0.5 * np.sin(sum((i + 2) * np.pi * g for i, g in enumerate(grids)))
        first, second = (np.stack([low + (high - low) * (pattern if c % 2 == 0 else 1 - pattern)
                                   for c in range(self.n_channels)]).astype(np.float32) for pattern in (ramp, wave))
        what = (f"IBIX's load-time check input ({self.n_channels} channel(s) of {list(shape)} voxels, smooth values "
                f"in [{low:.4g}, {high:.4g}] in the model's input units)")
        return first, second, what

    def check_runs(self) -> None:
        """Run the model at load time on two small smooth inputs: the first alone, then again alone, then in one
        batch with the second between two copies of the first (three model calls, five samples).

        A card that does not fit the model fails here; a model whose output is NaN or infinite on them is refused
        with the inputs named; a model whose two runs of the same input differ by more than the device's float
        rounding (dropout or random nodes left in the export) is refused naming the difference; a model that mixes
        the samples of a batch (a sample's output changes beside other samples, as with batch statistics) is run one
        sample per call from then on, and the card's assumptions say so.
        """
        spec = self.card.input
        side = 32 if self.card.spatial_dims == 2 else 16
        shape = [size if size else -(-side // spec.multiple_of) * spec.multiple_of
                 for size in (spec.size or (None,) * self.card.spatial_dims)]
        if spec.patch is not None:
            shape = list(spec.patch.size)
        if int(np.prod(shape)) > CHECK_VOXELS:
            note = (f"no load-time check (the model's fixed input of {list(shape)} voxels is too large): the card "
                    "is trusted, the model assumed deterministic and the samples of a batch independent")
            self.card = replace(self.card, assumptions=self.card.assumptions + (note,))
            log.info("%s: %s", self.path.name, note)
            return
        first, second, what = self._check_inputs(shape)
        probe = PreparedInput(first[None], tuple(shape), Geometry.identity(shape), np.ones(self.n_channels, np.float32),
                              np.zeros(self.n_channels, np.float32), None, None, False, False, False)
        undefined = (f"the model produced NaN or infinite values on {what}: check the model, or, if it takes other "
                     "input values, write the mapping to them in the card's 'input.intensity'")
        try:
            try:
                alone = self.run(first[None].copy(), probe, lambda i: what)[0]
                again = self.run(first[None].copy(), probe, lambda i: what)[0]
            except _NonFiniteOutput:
                raise ModelError(undefined) from None
            except ModelError as exc:
                raise ModelError(f"the model does not run as its card describes it ({exc}); IBIX fed "
                                 f"{self.card.input.layout} with channels {list(self.card.input.channels)}: check the "
                                 "card's 'input.layout', 'input.channels', 'input.size' and 'input.multiple_of'"
                                 ) from None
            self._check_deterministic(alone, again)
            try:
                together = self.run(np.stack([first, second, first]), probe, lambda i: what)
            except _NonFiniteOutput:
                raise ModelError(undefined) from None
            except ModelError as exc:  # one sample runs: not a matter of the card's layout
                raise ModelError(f"the model runs on one sample but not on a batch of three ({exc})") from None
        finally:
            self.evaluations = self.evaluated_voxels = 0
        difference = float(max(np.abs(together[0] - alone).max(), np.abs(together[2] - alone).max()))
        if difference > BATCH_TOLERANCE * (float(np.abs(alone).max()) + float(np.abs(together).max())) + 1e-12:
            self.one_sample_per_call = True
            note = (f"the model mixes the samples of a batch (a sample's output changed by up to {difference:.3g} "
                    "beside other samples): IBIX runs it one sample per model call")
            self.card = replace(self.card, assumptions=self.card.assumptions + (note,))
            log.warning("%s: %s", self.path.name, note)

    def _check_deterministic(self, first: np.ndarray, second: np.ndarray) -> None:
        """Refuse a model whose two runs of the same input differ beyond the device's float rounding."""
        difference = float(np.abs(first - second).max())
        peak = max(float(np.abs(first).max()), float(np.abs(second).max()))
        tolerance = DETERMINISM_TOLERANCE.get(self.device, max(DETERMINISM_TOLERANCE.values()))
        if difference <= tolerance * peak + 1e-30:
            return
        try:
            from .model_file import operator_types
            random = sorted(set(RANDOM_OPERATORS) & operator_types(self.path))
        except (ModelError, OSError, ValueError):
            random = []
        found = f" (this graph has {', '.join(random)} nodes)" if random else ""
        raise ModelError(f"{self.path.name}: the model is not deterministic: two runs of the same input at load time "
                         f"gave outputs that differ by up to {difference:.3g} (largest output {peak:.3g}; "
                         f"{difference / peak if peak else float('inf'):.2g} of it, above the "
                         f"{tolerance:g} of float rounding on {self.device}), so its maps would show noise, not the "
                         "model's response. "
                         f"The usual cause is dropout or random nodes left in the export{found}: export the model in "
                         "evaluation mode (model.eval() before torch.onnx.export) and without random operators")

    def predict(self, x: Any, geometry: Geometry | None = None, progress: ProgressCallback | None = None,
                cancel: Any = None) -> np.ndarray:
        """The model's output (output units, float32) for input ``x`` on the input's grid."""
        check_arguments(geometry=geometry, progress=progress, cancel=cancel)
        prepared = self.prepare(x, geometry)
        return prepared.from_samples(self.predict_samples(prepared, progress=progress, cancel=cancel))

    def predict_samples(self, prepared: PreparedInput, indices: Sequence[int] | None = None,
                        progress: ProgressCallback | None = None, cancel: Any = None) -> np.ndarray:
        """Outputs for the given samples of a prepared input (all by default), (n, *sample_shape)."""
        indices = np.arange(len(prepared.samples)) if indices is None else np.asarray(indices)
        out = np.empty((len(indices),) + prepared.sample_shape, np.float32)
        for start, stop, chunk in self.run_chunked(lambda a, b: prepared.samples[indices[a:b]].copy(),
                                                   len(indices), prepared,
                                                   lambda i: f"the unperturbed input (sample {int(indices[i])})",
                                                   cancel=cancel):
            out[start:stop] = chunk
            if progress:
                progress(stop, len(indices), "predicting")
        return out


def _onnxruntime():
    try:
        import onnxruntime
    except ModuleNotFoundError as exc:
        if exc.name != "onnxruntime":  # installed, but a module it needs is not
            raise ModelError(f"ONNX Runtime is installed but cannot be imported: {exc}; reinstall it (pip install "
                             "--force-reinstall onnxruntime, or onnxruntime-gpu)") from None
        raise ModelError("ONNX Runtime is not installed: pip install 'ibix[cpu]' (or 'ibix[gpu]' with an NVIDIA "
                         "GPU); in 3D Slicer, IBIX offers to install it on first use") from None
    except (ImportError, MemoryError, OSError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, MemoryError) or any(w in message.lower() for w in ("memory", "map segment", "mmap")):
            raise ModelError(f"ONNX Runtime could not be loaded for lack of memory ({message}); close other "
                             "programs or raise this process's memory limit, and try again") from None
        raise ModelError(f"ONNX Runtime is installed but cannot be loaded: {message}; reinstall it (pip install "
                         "--force-reinstall onnxruntime, or onnxruntime-gpu)") from None
    return onnxruntime


# -- the session cache ---------------------------------------------------------------------------------
#: Loaded ONNX Runtime sessions, most recent last, keyed by (file, size, mtime, inode, providers).
_SESSIONS: "OrderedDict[tuple, Any]" = OrderedDict()
_SESSIONS_LOCK = threading.Lock()
#: Sessions kept at once (each holds the model's weights, possibly on the GPU).
SESSION_CACHE_SIZE = 2


def _file_key(path: Path) -> tuple:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino


def release_models() -> int:
    """Drop every cached ONNX Runtime session (freeing its memory once no Model uses it); return how many."""
    with _SESSIONS_LOCK:
        count = len(_SESSIONS)
        _SESSIONS.clear()
    return count


def cached_sessions() -> int:
    """How many ONNX Runtime sessions the cache holds."""
    return len(_SESSIONS)


def _session(path: Path, providers: list[str]) -> Any:
    """The ONNX Runtime session of ``path``, reused while the file (size, mtime, inode) is unchanged."""
    file_key = _file_key(path)
    key = file_key + (tuple(providers),)
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(key)
        if session is not None:
            _SESSIONS.move_to_end(key)
            return session
    check_external_data(path)
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "external data path" in first.lower():  # ONNX Runtime >= 1.20 validates locations itself
            raise ModelError(f"{path}: refused by ONNX Runtime: {first}") from None
        raise ModelError(f"{path}: not a loadable ONNX model ({first}); check the file is a complete ONNX "
                         "export") from None
    with _SESSIONS_LOCK:
        for old in [k for k in _SESSIONS if k[0] == file_key[0]]:  # the file changed: drop the old session
            del _SESSIONS[old]
        _SESSIONS[key] = session
        while len(_SESSIONS) > SESSION_CACHE_SIZE:
            _SESSIONS.popitem(last=False)
    return session


def free_device_memory() -> int | None:
    """Free memory (bytes) of the current CUDA device, or None where it cannot be read: from the CUDA runtime that
    ONNX Runtime's CUDA provider loaded, else from ``nvidia-smi``."""
    import ctypes
    import subprocess

    for name in ("libcudart.so.12", "libcudart.so", "cudart64_12.dll"):
        try:
            runtime = ctypes.CDLL(name)
        except OSError:
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        if runtime.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) == 0:
            return int(free.value)
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", "0"],
                              capture_output=True, text=True, timeout=10)
        return int(float(done.stdout.split()[0]) * 2**20) if done.returncode == 0 and done.stdout.split() else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def default_memory_budget(device: str, free: Callable[[], int | None] = free_device_memory) -> int:
    """The batch memory budget when none is given: DEFAULT_MEMORY_BUDGET on the CPU (where batches beyond
    CPU_BATCH_VOXELS gain nothing anyway); GPU_MEMORY_SHARE of the free device memory with CUDA (at least
    DEFAULT_MEMORY_BUDGET when it cannot be read)."""
    if device != "cuda":
        return DEFAULT_MEMORY_BUDGET
    available = free()
    return DEFAULT_MEMORY_BUDGET if not available else max(int(GPU_MEMORY_SHARE * available), 2**20)


def load_model(path: str | os.PathLike, card: Mapping[str, Any] | str | os.PathLike | None = None,
               device: str = "auto", memory_budget: int | None = None) -> Model:
    """Load an ONNX model and its card.

    Parameters
    ----------
    path : path-like
        The ``.onnx`` file.
    card : dict or path-like, optional
        The model card; by default ``<model>.json`` beside the model, or inferred from the ONNX signature
        (what was assumed is logged and kept in ``model.card.assumptions``).
    device : {"auto", "cuda", "cpu"}
        ``auto`` runs on CUDA when ONNX Runtime offers it and falls back to the CPU with a warning.
    memory_budget : int, optional
        Bytes one batch of samples (inputs and activations) may take; sets the batch size (on the CPU no batch
        goes beyond the full-speed size, :data:`CPU_BATCH_VOXELS`). Default: 512 MiB on the CPU, half the GPU's
        free memory with CUDA (:func:`default_memory_budget`).
    """
    checked = check_arguments(path=path, device=device,
                              **({} if memory_budget is None else {"memory_budget": memory_budget}))
    path, memory_budget = checked["path"], checked.get("memory_budget")
    if not is_file(path, "model path", ModelError):
        raise ModelError(f"{path}: model file not found")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: the model file is empty; export the model again")
    card_dict, card_source = read_card(card, path)
    ort = _onnxruntime()
    available = ort.get_available_providers()
    want_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in available
    if device == "cuda" and not want_cuda:
        raise ModelError("device 'cuda' was asked for but ONNX Runtime has no CUDA provider here; install "
                         "onnxruntime-gpu with a working CUDA, or use device 'cpu' or 'auto'")
    providers = (["CUDAExecutionProvider"] if want_cuda else []) + ["CPUExecutionProvider"]
    started = time.perf_counter()
    try:
        session = _session(path, providers)
    except ModelError as exc:
        if not want_cuda:
            raise
        # a CUDA start that fails (drivers, libraries, memory) is no reason to refuse a model the CPU can run
        session = _session(path, ["CPUExecutionProvider"])
        if device == "cuda":
            raise ModelError(f"device 'cuda' was asked for but CUDA could not start ({exc}); use device 'cpu' or "
                             "'auto', or fix the CUDA installation") from None
    active = session.get_providers()[0]
    if device == "cuda" and active != "CUDAExecutionProvider":
        raise ModelError("device 'cuda' was asked for but CUDA could not start for this model; use device 'cpu' "
                         "or 'auto', or fix the CUDA installation")
    if want_cuda and active != "CUDAExecutionProvider":
        log.warning("CUDA could not start for %s; running on the CPU", path.name)
    run_device = "cuda" if active == "CUDAExecutionProvider" else "cpu"
    resolved = resolve_card(card_dict, session.get_inputs(), session.get_outputs())
    for assumption in resolved.assumptions:
        log.info("%s: assumed %s", path.name, assumption)
    log.info("%s loaded in %.2f s on %s (%s; card: %s)", path.name, time.perf_counter() - started, run_device,
             active, card_source)
    model = Model(session, resolved, path, run_device,
                  default_memory_budget(run_device) if memory_budget is None else memory_budget)
    model.check_runs()
    return model
