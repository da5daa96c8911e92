"""The cohort report: ``DIR/report.html``, one self-contained page (every image inline as a base64 PNG).

It shows the distribution of each statistic over the cases that ran (a box plot with every case as a point),
names the outlier cases, lists the failed cases with their errors, and shows a thumbnail of each case's map.

Outliers are defined by Tukey's fences: a value below Q1 - 1.5 IQR or above Q3 + 1.5 IQR of its statistic over
the cases with status ``ok`` (Q1, Q3: the 25th and 75th percentiles, linear interpolation; IQR = Q3 - Q1). With
fewer than :data:`MIN_CASES_FOR_OUTLIERS` values a statistic names no outliers (quartiles of fewer cases say
little).
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError
from .io import atomic_write

#: Tukey's fence factor: outliers lie more than this many IQRs beyond the quartiles.
FENCE = 1.5
#: The fewest values of a statistic for which outliers are named.
MIN_CASES_FOR_OUTLIERS = 4
#: Width (pixels) of the thumbnails of the case maps.
THUMBNAIL_WIDTH = 360

#: What each plotted column is, for captions (name: (label, units)).
DESCRIPTIONS = {
    "reach95_mm": ("reach95", "mm", "distance from the mask within which 95 % of the map's mass lies"),
    "inside_fraction": ("inside fraction", "", "share of sum |F| inside the input mask"),
    "blocks90": ("blocks90", "blocks", "fewest blocks holding 90 % of the mass of B"),
    "peak": ("peak", "", "largest |F| (output units per input unit) or largest B"),
    "evaluations": ("evaluations", "", "model evaluations of the mapping"),
    "seconds": ("seconds", "s", "wall time of the case in its worker"),
}


@dataclass(frozen=True)
class Outlier:
    """A case whose statistic lies beyond a Tukey fence."""

    case: str
    statistic: str
    value: float
    low: float
    high: float


def tukey_outliers(cases: Sequence[str], values: Sequence[float | None], statistic: str,
                   fence: float = FENCE) -> tuple[list[Outlier], tuple[float, float] | None]:
    """Outliers of one statistic by Tukey's fences, and the fences (None with too few values).

    Parameters
    ----------
    cases, values : sequence
        Case names and their values (None: undefined, left out).
    statistic : str
        The statistic's name (carried by the outliers).
    fence : float
        The fence factor k (outside [Q1 - k IQR, Q3 + k IQR]).
    """
    pairs = [(c, float(v)) for c, v in zip(cases, values) if v is not None and np.isfinite(v)]
    if len(pairs) < MIN_CASES_FOR_OUTLIERS:
        return [], None
    q1, q3 = np.percentile([v for _, v in pairs], [25, 75])
    low, high = q1 - fence * (q3 - q1), q3 + fence * (q3 - q1)
    return [Outlier(c, statistic, v, low, high) for c, v in pairs if v < low or v > high], (float(low), float(high))


def _png_data(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, facecolor="white")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def distribution_plot(statistic: str, cases: Sequence[str], values: Sequence[float], outliers: set[str],
                      fences: tuple[float, float] | None) -> str:
    """A horizontal box plot with every case as a point (outliers red and named); base64 PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    label, units, meaning = DESCRIPTIONS.get(statistic, (statistic, "", ""))
    fig = Figure(figsize=(4.6, 1.9), dpi=100, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0.06, 0.3, 0.9, 0.5])
    values = np.asarray(values, float)
    ax.boxplot(values, orientation="horizontal", widths=0.5, showfliers=False, medianprops={"color": "black"})
    spread = np.random.default_rng(0).uniform(-0.15, 0.15, len(values))  # fixed jitter: the page is reproducible
    red = np.array([c in outliers for c in cases])
    ax.scatter(values[~red], 1 + spread[~red], s=16, color="#1f77b4", alpha=0.8, zorder=3)
    ax.scatter(values[red], 1 + spread[red], s=22, color="#d62728", zorder=4)
    for case, value, dy in zip(np.asarray(cases)[red], values[red], spread[red]):
        ax.annotate(case, (value, 1 + dy), xytext=(0, 7), textcoords="offset points", ha="center", fontsize=7,
                    color="#d62728")
    if fences is not None:
        for fence in fences:
            if values.min() <= fence <= values.max():
                ax.axvline(fence, color="0.6", linestyle=":", linewidth=1)
    ax.set_yticks([])
    ax.set_xlabel(f"{label}{f' ({units})' if units else ''}", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.text(0.5, 0.95, f"{label}: {meaning}", ha="center", va="top", fontsize=7.5, color="0.25")
    return _png_data(fig)


def thumbnail(path: Path, width: int = THUMBNAIL_WIDTH) -> str | None:
    """A case's map PNG scaled to ``width`` pixels, as base64 PNG (None when it is missing or unreadable)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((width, 4 * width))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", optimize=True)
    except (OSError, UnidentifiedImageError):
        return None
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _number(value: float | None) -> str:
    if value is None:
        return "–"
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


_STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ccc; }
.meta { color: #555; font-size: 13px; }
.plots { display: flex; flex-wrap: wrap; gap: 8px; } .plots img { border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 12px; }
td, th { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
th { background: #f3f3f3; text-align: left; } tr.failed td { color: #a00; }
td.text { text-align: left; overflow-wrap: anywhere; } td.text:first-child { overflow-wrap: normal; }
.table { overflow-x: auto; }
.cases { display: flex; flex-wrap: wrap; gap: 12px; }
.case { border: 1px solid #ccc; padding: 6px; width: 370px; font-size: 12px; }
.case.outlier { border: 2px solid #d62728; } .case.failed { border: 2px dashed #a00; }
.case h3 { font-size: 14px; margin: 2px 0 4px; } .case img { width: 360px; display: block; }
.error { color: #a00; white-space: pre-wrap; overflow-wrap: anywhere; } .flag { color: #d62728; font-weight: bold; }
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: Sequence[int] = (0,),
           row_classes: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(f'<td class="text">{html.escape(c)}</td>' if j in text_columns else f"<td>{html.escape(c)}</td>"
                        for j, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<div class=\"table\"><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def write_report(folder: str | os.PathLike, rows: Sequence[dict], mapping: str, statistics: Sequence[str],
                 title: str | None = None, path: str | os.PathLike | None = None,
                 provenance: Sequence[str] = ()) -> Path:
    """Write ``folder/report.html`` (or ``path``) from the cohort's rows.

    Parameters
    ----------
    folder : path-like
        The cohort folder DIR (holds ``<case>/<mapping>.png`` for the thumbnails).
    rows : sequence of dict
        The rows of cohort.csv (case, status, error, evaluations, seconds, statistics; None for empty cells).
    mapping : {"forward", "backward"}
        Which maps the cases hold.
    statistics : sequence of str
        The statistic columns, in table order (peak locations included).
    title : str, optional
        The page's heading; default names the mapping and the model found in a case's summary.json.
    path : path-like, optional
        Where the page goes (a cohort stages it before the cohort's files are published); default
        ``folder/report.html``.
    provenance : sequence of str, optional
        Columns of the rows that say what a case read (its series, its structure and the structure's file): shown
        as text after the status in the table of every case, those that some case has.

    Returns
    -------
    Path
        The report, written under a temporary name and renamed when complete.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such cohort folder")
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] != "ok"]
    model = _model_name(folder, ok)
    title = title or f"IBIX cohort report: {mapping} maps" + (f" of {model}" if model else "")
    plotted = [s for s in statistics if s in DESCRIPTIONS] + ["evaluations", "seconds"]
    outliers: list[Outlier] = []
    plots = []
    for name in plotted:
        cases = [r["case"] for r in ok if r.get(name) is not None]
        values = [float(r[name]) for r in ok if r.get(name) is not None]
        if not values:
            continue
        # evaluations and seconds describe the run, not the map: shown, but no outliers named
        found, fences = tukey_outliers(cases, values, name) if name in statistics else ([], None)
        outliers += found
        image = distribution_plot(name, cases, values, {o.case for o in found}, fences)
        plots.append(f'<img alt="distribution of {html.escape(name)}" src="data:image/png;base64,{image}">')
    flagged = {o.case for o in outliers}

    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="meta">{len(rows)} cases: {len(ok)} ok, {len(failed)} failed · written '
             f'{html.escape(time.strftime("%Y-%m-%d %H:%M:%S"))} · folder {html.escape(str(folder))}</p>',
             "<h2>Distributions</h2>",
             '<p class="meta">Each point is a case with status ok; boxes span the quartiles, whiskers 1.5 IQR, '
             "dotted lines are Tukey's fences; red points are outliers (of the map statistics; evaluations and "
             "seconds are shown for the record).</p>",
             f'<div class="plots">{"".join(plots) or "<p>No statistics to plot.</p>"}</div>',
             "<h2>Outliers</h2>"]
    if outliers:
        parts.append('<p class="meta">Cases beyond a Tukey fence (Q1 − 1.5 IQR, Q3 + 1.5 IQR) of a statistic.</p>')
        parts.append(_table(["case", "statistic", "value", "low fence", "high fence"],
                            [[o.case, o.statistic, _number(o.value), _number(o.low), _number(o.high)]
                             for o in outliers], text_columns=(0, 1)))
    else:
        parts.append(f'<p class="meta">No outliers (Tukey fences need at least {MIN_CASES_FOR_OUTLIERS} cases '
                     "with a value).</p>")
    parts.append("<h2>Failed cases</h2>")
    parts.append(_table(["case", "error"], [[r["case"], r.get("error") or ""] for r in failed],
                        text_columns=(0, 1)) if failed else '<p class="meta">None.</p>')
    parts.append("<h2>Statistics of every case</h2>")
    read = [c for c in provenance if any(r.get(c) for r in rows)]
    columns = ["case", "status"] + read + ["evaluations", "seconds"] + list(statistics)
    parts.append(_table(columns, [[r["case"], r["status"]] + [str(r.get(c) or "") for c in read]
                                  + [_number(r.get(c)) for c in columns[2 + len(read):]] for r in rows],
                        text_columns=range(2 + len(read)),
                        row_classes=["failed" if r["status"] != "ok" else "" for r in rows]))
    parts.append("<h2>Maps</h2>")
    cards = []
    for row in rows:
        name = row["case"]
        classes = "case" + (" failed" if row["status"] != "ok" else " outlier" if name in flagged else "")
        body = [f"<h3>{html.escape(name)}"
                + (' <span class="flag">outlier</span>' if name in flagged else "") + "</h3>"]
        if row["status"] == "ok":
            data = thumbnail(folder / name / f"{mapping}.png")
            body.append(f'<img alt="{html.escape(mapping)} map of {html.escape(name)}" '
                        f'src="data:image/png;base64,{data}">' if data else '<p class="meta">no PNG written</p>')
            body.append("<div>" + " · ".join(f"{html.escape(s)} {_number(row.get(s))}" for s in statistics
                                            if s in DESCRIPTIONS) + "</div>")
        else:
            body.append(f'<p class="error">{html.escape(row.get("error") or "failed")}</p>')
        cards.append(f'<div class="{classes}">{"".join(body)}</div>')
    parts.append(f'<div class="cases">{"".join(cards)}</div>')
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    path = Path(path) if path is not None else folder / "report.html"
    try:
        with atomic_write(path) as temporary:
            temporary.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot write the report ({exc.strerror or exc})") from None
    return path


def _model_name(folder: Path, rows: Sequence[dict]) -> str | None:
    """The model's name from the first readable case summary."""
    for row in rows:
        try:
            summary = json.loads((folder / row["case"] / "summary.json").read_text())
        except (OSError, ValueError):
            continue
        card = summary.get("model", {}).get("card", {})
        return card.get("name") or Path(summary.get("model", {}).get("path", "")).name or None
    return None
