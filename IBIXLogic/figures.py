"""PNG figures of IBIX maps: a map in colour over a grey image, with the mask outlined.

Rendered with matplotlib's Agg canvas (no pyplot, no global backend switch); imported lazily by the command
line and the demo only, so the engine itself never needs matplotlib.

Slices are shown in the radiological convention read from the volume's direction matrix (LPS): axial slices
with anterior up and the patient's right on the left of the screen, coronal and sagittal slices with superior
up. Pixels keep their physical aspect ratio.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError
from .geometry import Geometry

#: Default number of panels of a montage.
MAX_PANELS = 6
#: Map values below this fraction of the colour scale's maximum are drawn transparent.
DEFAULT_THRESHOLD = 0.03
#: Opacity of the map where it is drawn.
MAP_ALPHA = 0.8

_PLANE_NAMES = {0: "sagittal", 1: "coronal", 2: "axial"}
# per plane (physical LPS axis of the slice normal): horizontal physical axis (increasing to the right of the
# screen), vertical physical axis and its sign going down the screen, and the edge letters (left, right, top,
# bottom).
_PLANES = {
    2: (0, 1, +1, ("R", "L", "A", "P")),
    1: (0, 2, -1, ("R", "L", "S", "I")),
    0: (1, 2, -1, ("A", "P", "S", "I")),
}


@dataclass(frozen=True)
class Plane:
    """How to turn a 2D array slice into a screen image (transpose, then flips) and its pixel aspect."""

    axis: int | None
    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False
    row_spacing: float = 1.0
    col_spacing: float = 1.0
    name: str = "image"
    edges: tuple[str, str, str, str] | None = None

    def take(self, volume: np.ndarray, index: int) -> np.ndarray:
        """Slice ``index`` of ``volume`` (or the image itself when 2D), oriented for the screen."""
        image = np.asarray(volume) if self.axis is None else np.take(volume, index, axis=self.axis)
        if self.transpose:
            image = image.T
        if self.flip_rows:
            image = image[::-1]
        if self.flip_cols:
            image = image[:, ::-1]
        return image


def plane_for(geometry: Geometry, ndim: int, axis: int | None) -> Plane:
    """The display plane of array axis ``axis`` of a volume (None for a 2D image)."""
    if ndim == 2 or axis is None:
        spacing = geometry.spacing_array_order()[-2:] if geometry.dimension == 2 else (1.0, 1.0)
        return Plane(None, row_spacing=spacing[0], col_spacing=spacing[1])
    directions = geometry.array_axis_directions()
    spacing = geometry.spacing_array_order()
    normal = int(np.argmax(np.abs(directions[axis])))
    horizontal, vertical, down, edges = _PLANES[normal]
    rows, cols = [a for a in range(3) if a != axis]
    transpose = abs(directions[rows][horizontal]) > abs(directions[cols][horizontal])
    if transpose:
        rows, cols = cols, rows
    flip_cols = directions[cols][horizontal] < 0
    flip_rows = directions[rows][vertical] * down < 0
    return Plane(axis, transpose, bool(flip_rows), bool(flip_cols), spacing[rows], spacing[cols],
                 _PLANE_NAMES[normal], edges)


def display_axis(geometry: Geometry, ndim: int, preferred: int | None = None) -> int | None:
    """Array axis to show slices along: ``preferred`` (a 2D model's slice axis), else the axial axis."""
    if ndim == 2:
        return None
    if preferred is not None:
        return int(preferred)
    from .geometry import slice_array_axis
    try:
        return slice_array_axis(geometry, "axial")
    except InputError:
        return 0


def choose_slices(mask: np.ndarray, axis: int | None, limit: int = MAX_PANELS,
                  requested: int | None = None) -> list[int]:
    """Slices to show: ``requested``, else up to ``limit`` evenly spread slices that ``mask`` touches."""
    if axis is None:
        return [0]
    n = mask.shape[axis]
    if requested is not None:
        if not 0 <= requested < n:
            raise InputError(f"--slice {requested} is outside the volume: it has {n} slices along the display "
                             f"axis (0..{n - 1})")
        return [int(requested)]
    others = tuple(a for a in range(mask.ndim) if a != axis)
    touched = np.flatnonzero(np.asarray(mask).any(axis=others))
    if len(touched) == 0:
        return [n // 2]
    if len(touched) <= limit:
        return [int(t) for t in touched]
    picks = np.unique(np.round(np.linspace(0, len(touched) - 1, limit)).astype(int))
    return [int(touched[p]) for p in picks]


def _percentiles(values: np.ndarray, q: Sequence[float]) -> np.ndarray:
    values = np.asarray(values, np.float32).ravel()
    step = max(1, values.size // 500_000)
    return np.percentile(values[::step], q)


def grey_window(values: np.ndarray, context: np.ndarray | None = None) -> tuple[float, float]:
    """Grey levels for ``values``: the 3rd to 99.5th percentile of its object voxels, with the object told apart
    from the background (below 20 % of the range) on ``context`` (e.g. the whole slices of a cropped view)."""
    values = np.asarray(values, np.float32)
    context = values if context is None else np.asarray(context, np.float32)
    low, high = (float(v) for v in _percentiles(context, [1, 99.5]))
    if not high > low:
        low, high = float(np.min(values)), float(np.max(values))
        return low, (high if high > low else low + 1.0)
    inside = values[values > low + 0.2 * (high - low)]
    if inside.size > 100:
        in_low, in_high = (float(v) for v in _percentiles(inside, [3, 99.5]))
        if in_high > in_low:
            # keep the background dark but spend the grey levels on the object
            return max(low, in_low - 0.2 * (in_high - in_low)), in_high
    return low, high


def _object_region(images: Sequence[np.ndarray]) -> np.ndarray:
    """Voxels of the imaged object (head, body) on any of the slices, without isolated noise."""
    from scipy import ndimage

    stack = np.stack(images)
    low, high = (float(v) for v in _percentiles(stack, [1, 99.5]))
    region = (stack > low + 0.2 * (high - low)).any(axis=0)
    return ndimage.binary_opening(region, iterations=2)


def _box(region: np.ndarray, margin_rows: float, margin_cols: float) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
    r0, r1 = max(0, int(rows[0] - margin_rows)), min(region.shape[0], int(rows[-1] + margin_rows + 1))
    c0, c1 = max(0, int(cols[0] - margin_cols)), min(region.shape[1], int(cols[-1] + margin_cols + 1))
    return slice(r0, r1), slice(c0, c1)


def crop_box(images: Sequence[np.ndarray], keep: Sequence[np.ndarray], mode: str = "roi",
             spacing: tuple[float, float] = (1.0, 1.0), context_mm: float = 30.0) -> tuple[slice, slice]:
    """Rows and columns to show. ``body``: the object's bounding box; ``roi``: the region ``keep`` (mask and
    visible map) with ``context_mm`` (at least 60 % of its size) around it, within the object's box; ``none``."""
    everything = (slice(None), slice(None))
    if mode == "none":
        return everything
    body = _object_region(images)
    roi = np.zeros_like(body)
    for k in keep:
        roi |= k
    body |= roi
    if not body.any():
        return everything
    body_box = _box(body, 4, 4)
    if mode == "body" or not roi.any():
        return body_box
    rows, cols = np.flatnonzero(roi.any(1)), np.flatnonzero(roi.any(0))
    margin_rows = max(context_mm / spacing[0], 0.6 * (rows[-1] - rows[0] + 1))
    margin_cols = max(context_mm / spacing[1], 0.6 * (cols[-1] - cols[0] + 1))
    roi_box = _box(roi, margin_rows, margin_cols)
    return (slice(max(roi_box[0].start, body_box[0].start), min(roi_box[0].stop, body_box[0].stop)),
            slice(max(roi_box[1].start, body_box[1].start), min(roi_box[1].stop, body_box[1].stop)))


def overlay_figure(path: str | Path, *, background: np.ndarray, overlay: np.ndarray, mask: np.ndarray,
                   geometry: Geometry, axis: int | None, slices: Sequence[int], cmap: str, colorbar_label: str,
                   title: str, subtitle: str = "", scale_note: str = "", background_label: str = "image", mask_label: str = "mask", outline_color: str = "cyan",
                   vmax: float | None = None, threshold: float = DEFAULT_THRESHOLD, labels: np.ndarray | None = None,
                   window: tuple[float, float] | None = None, crop: str = "roi", crop_reference: np.ndarray | None = None, panel_inches: float = 2.9, dpi: int = 100, max_colors: int | None = None
                   ) -> Path:
    """Write a PNG montage: ``overlay`` (>= 0) in colour over ``background`` in grey, ``mask`` outlined.

    Values below ``threshold * vmax`` are transparent. ``window``: grey levels of the background (default: from
    the object's percentiles). ``labels`` (block labels) draws faint block borders
    where the map is shown. ``max_colors`` quantises the PNG to a palette (smaller files for documentation).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    import matplotlib

    path = Path(path)
    plane = plane_for(geometry, np.ndim(background), axis)
    overlay = np.abs(np.asarray(overlay, np.float32))
    peak = float(overlay.max()) if overlay.size else 0.0
    vmax = float(vmax) if vmax is not None and vmax > 0 else (peak if peak > 0 else 1.0)
    backgrounds = [plane.take(background, s).astype(np.float32) for s in slices]
    overlays = [plane.take(overlay, s) for s in slices]
    masks = [plane.take(mask, s).astype(bool) for s in slices]
    borders = None
    if labels is not None:
        from skimage.segmentation import find_boundaries
        borders = [find_boundaries(plane.take(labels, s), mode="inner") for s in slices]
    references = backgrounds if crop_reference is None else [plane.take(crop_reference, s) for s in slices]
    rows_cut, cols_cut = crop_box(references, [m | (o >= threshold * vmax) for m, o in zip(masks, overlays)],
                                  crop, (plane.row_spacing, plane.col_spacing))
    grey_low, grey_high = window if window is not None else \
        grey_window(np.stack([b[rows_cut, cols_cut] for b in backgrounds]), np.stack(backgrounds))

    import textwrap

    n = len(slices)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    height, width = backgrounds[0][rows_cut, cols_cut].shape
    aspect = (height * plane.row_spacing) / (width * plane.col_spacing)
    panel_w = panel_inches if n > 1 else 4.4
    panel_h = min(panel_w * aspect, 1.6 * panel_w)
    panel_w = panel_h / aspect
    panels_w = max(ncols * panel_w, 4.4)
    fig_w = panels_w + 1.4
    title_lines = textwrap.wrap(title, max(30, int(fig_w * 8.5)))
    subtitle_lines = textwrap.wrap(subtitle, max(40, int(fig_w * 13))) if subtitle else []
    top_inches = 0.12 + 0.2 * len(title_lines) + 0.15 * len(subtitle_lines) + 0.25
    fig_h = nrows * (panel_h + 0.25) + top_inches + 0.5
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    colormap = matplotlib.colormaps[cmap]
    norm = Normalize(0.0, vmax)
    pad = (panels_w - ncols * panel_w) / 2
    left, right = (0.1 + pad) / fig_w, (0.1 + pad + ncols * panel_w) / fig_w
    bottom, top = 0.5 / fig_h, 1 - top_inches / fig_h
    grid = fig.add_gridspec(nrows, ncols, left=left, right=right, bottom=bottom, top=top, wspace=0.04,
                            hspace=0.25 / panel_h)
    for i, s in enumerate(slices):
        ax = fig.add_subplot(grid[i // ncols, i % ncols])
        bg = backgrounds[i][rows_cut, cols_cut]
        value = overlays[i][rows_cut, cols_cut]
        inside = masks[i][rows_cut, cols_cut]
        shown = value >= threshold * vmax
        rgba = colormap(norm(value))
        rgba[..., 3] = np.where(shown, MAP_ALPHA, 0.0)
        ratio = plane.row_spacing / plane.col_spacing
        ax.imshow(bg, cmap="gray", vmin=grey_low, vmax=grey_high, interpolation="nearest", aspect=ratio)
        if borders is not None:
            rgba[..., 3] = np.where(borders[i][rows_cut, cols_cut] & shown, MAP_ALPHA * 0.75, rgba[..., 3])
        ax.imshow(rgba, interpolation="nearest", aspect=ratio)
        if inside.any() and not inside.all():
            ax.contour(inside.astype(np.float32), levels=[0.5], colors=[outline_color], linewidths=1.4)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        label = "image" if plane.axis is None else f"{plane.name} slice {s}"
        ax.set_title(label, fontsize=8.5, pad=2)
        if plane.edges is not None:
            from matplotlib import patheffects
            style = dict(color="white", fontsize=7, transform=ax.transAxes, fontweight="bold",
                         path_effects=[patheffects.withStroke(linewidth=1.5, foreground="black")])
            ax.text(0.015, 0.5, plane.edges[0], ha="left", va="center", **style)
            ax.text(0.985, 0.5, plane.edges[1], ha="right", va="center", **style)
            ax.text(0.5, 0.985, plane.edges[2], ha="center", va="top", **style)
    bar_ax = fig.add_axes([(panels_w + 0.3) / fig_w, bottom + 0.05 * (top - bottom),
                           0.16 / fig_w, 0.9 * (top - bottom)])
    bar = fig.colorbar(ScalarMappable(norm, colormap), cax=bar_ax, extend="max" if peak > vmax * 1.0001 else "neither")
    bar.set_label(colorbar_label, fontsize=8.5)
    bar.ax.tick_params(labelsize=7.5)
    centre = 0.5
    fig.text(centre, 1 - 0.1 / fig_h, "\n".join(title_lines), ha="center", va="top", fontsize=10.5,
             fontweight="bold", linespacing=1.15)
    if subtitle_lines:
        fig.text(centre, 1 - (0.14 + 0.2 * len(title_lines)) / fig_h, "\n".join(subtitle_lines), ha="center",
                 va="top", fontsize=7.5, color="0.2", linespacing=1.2)
    handles = [Line2D([], [], color=outline_color, linewidth=1.6, label=mask_label)]
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(centre, 0.13 / fig_h), frameon=False,
               fontsize=8, ncol=1, borderpad=0.1)
    note = f"map drawn where it is at least {threshold:.0%} of the colour scale's top"
    if peak > vmax * 1.0001:
        note += f" (scale clipped at {scale_note or 'a robust maximum'}; largest value {peak:.3g})"
    fig.text(centre, 0.04 / fig_h, note + "; grey: " + background_label, ha="center", va="bottom", fontsize=6.5,
             color="0.35")
    return _save(fig, path, dpi, max_colors)


def _save(fig, path: Path, dpi: int, max_colors: int | None) -> Path:
    """Save atomically (temporary name, then rename); optionally as a palette PNG."""
    import os

    from .io import temporary_path

    temporary = temporary_path(path, ".png")
    try:
        if max_colors:
            from PIL import Image
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
            buffer.seek(0)
            image = Image.open(buffer).convert("RGB")
            image.quantize(colors=int(max_colors), method=Image.Quantize.FASTOCTREE,
                           dither=Image.Dither.NONE).save(temporary, format="PNG", optimize=True)
        else:
            fig.savefig(temporary, format="png", dpi=dpi, facecolor="white")
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write the figure ({exc}); check the folder is writable") from None
    return path


def robust_max(values: np.ndarray, percentile: float = 99.0, spike: float = 2.5) -> float:
    """Top of a colour scale: the largest |value|, unless it exceeds ``spike`` times the ``percentile`` of the
    nonzero |values|, then that percentile (so that a few extreme voxels do not wash out the map)."""
    magnitude = np.abs(np.asarray(values, np.float32))
    nonzero = magnitude[magnitude > 0]
    if not nonzero.size:
        return 0.0
    peak, robust = float(nonzero.max()), float(np.percentile(nonzero, percentile))
    return robust if peak > spike * robust else peak


def forward_figure(path: str | Path, output: np.ndarray, forward_abs: np.ndarray, mask: np.ndarray,
                   geometry: Geometry, axis: int | None, slices: Sequence[int], units: str, output_name: str,
                   subtitle: str = "", **kw) -> Path:
    """F over the model output: where and how strongly the output reacts to jittering the input mask."""
    kw.setdefault("vmax", robust_max(forward_abs))
    kw.setdefault("scale_note", "the 99th percentile of the nonzero |F|")
    return overlay_figure(
        path, background=output, overlay=forward_abs, mask=mask, geometry=geometry, axis=axis, slices=slices,
        cmap="inferno", colorbar_label=f"|F|  ({units})", outline_color="cyan",
        mask_label="input mask $M^x$ (the jittered voxels)", background_label=f"model output ({output_name})",
        title=f"Forward map F: where the output ({output_name}) changes when the input mask is jittered",
        subtitle=subtitle, **kw)


def backward_figure(path: str | Path, image: np.ndarray, backward: np.ndarray, mask: np.ndarray,
                    geometry: Geometry, axis: int | None, slices: Sequence[int], input_name: str,
                    labels: np.ndarray | None = None, normalization: str = "fraction", subtitle: str = "",
                    **kw) -> Path:
    """B over the input: which input blocks drive the output mask."""
    what = ("fraction of the block's effect that lands in $M^f$" if normalization == "fraction"
            else "effect on $M^f$, scaled to max 1")
    return overlay_figure(
        path, background=image, overlay=backward, mask=mask, geometry=geometry, axis=axis, slices=slices,
        cmap="viridis", colorbar_label=f"B  ({what}; 0-1)", outline_color="red",
        mask_label="output mask $M^f$ (the explained output voxels)", background_label=f"input ({input_name})", vmax=1.0 if normalization == "fraction"
        else None, labels=labels,
        title=f"Backward map B: which input ({input_name}) regions drive the output mask",
        subtitle=subtitle, **kw)
