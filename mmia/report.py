"""Audit outputs: metrics.json, scores.csv, roc.png and a self-contained report.html."""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import numbers
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from mmia.errors import MmiaError
from mmia.metrics import LOW_FPRS

BLIND = "blind"
SHIFT_MARGIN = 0.02
TOP_K = 10
ROC_KEEP_FPR = 0.01  # every ROC point at or below this FPR is plotted
ROC_CELLS_PER_DECADE = 1000  # above it, one point in and one out of each log-log cell
HISTOGRAM_BINS = 40
CSV_ROWS_PER_WRITE = 65_536
CSV_NEEDS_QUOTES = re.compile(r'[,"\r\n]')  # csv.writer's QUOTE_MINIMAL rule
# an image loader: row indices of the evaluation set -> their encoded images (None: unreadable)
ImageLoader = Callable[[list[int]], Sequence[bytes | None]]
TEMPLATE = "report.html.j2"
OUTPUTS = ("metrics.json", "scores.csv", "roc.png", "report.html")
NO_INTERVAL = "no valid interval"
# (column heading, result key): ROC figures on the evaluation set (oracle thresholds)
ROC_COLUMNS = (("AUC", "auc"), ("TPR@1%FPR", "tpr@1%fpr"), ("TPR@0.1%FPR", "tpr@0.1%fpr"))
# the calibrated decision: a threshold set on known non-members, applied to the evaluation set
DECISION_COLUMNS = (
    ("target FPR", "target_fpr"),
    ("threshold", "threshold"),
    ("threshold source", "threshold_source"),
    ("n_calibration", "n_calibration"),
    ("TPR at threshold", "tpr_at_threshold"),
    ("achieved FPR", "achieved_fpr"),
    ("balanced accuracy", "balanced_accuracy"),
)
INTERVAL_METRICS = ("auc", "tpr@1%fpr", "tpr@0.1%fpr", "tpr_at_threshold", "achieved_fpr")
CI_METHOD_NAMES = {
    "delong": "DeLong",
    "bootstrap": "stratified bootstrap",
    "clopper-pearson": "exact Clopper-Pearson",
}


def jsonable(obj):
    """Convert numpy scalars/arrays and non-finite floats into JSON-safe values."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def thin_roc(fpr: np.ndarray, tpr: np.ndarray, keep_fpr: float = ROC_KEEP_FPR,
             per_decade: int = ROC_CELLS_PER_DECADE) -> np.ndarray:
    """Indices of the ROC points (positive, ascending FPR) that the log-log plot needs: all
    with FPR <= keep_fpr; above it, the first and last point in each cell of a grid of
    1/per_decade decade on both axes, so the thinned step curve stays within one cell (far
    below a pixel) of the full one. At most ~4 * per_decade * decades points are kept."""
    if fpr.size == 0:
        return np.arange(0)
    cell = np.floor(np.log10(fpr) * per_decade) * 1e6 + np.floor(np.log10(tpr) * per_decade)
    starts = np.r_[True, cell[1:] != cell[:-1]]
    ends = np.r_[cell[1:] != cell[:-1], True]
    return np.flatnonzero((fpr <= keep_fpr) | starts | ends)


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (FPR, TPR) points of the log-log ROC plot: both positive, thinned by `thin_roc`."""
    fpr, tpr, _ = roc_curve(labels, np.asarray(scores, float), pos_label=1)
    ok = (fpr > 0) & (tpr > 0)
    fpr, tpr = fpr[ok], tpr[ok]
    keep = thin_roc(fpr, tpr)
    return fpr[keep], tpr[keep]


def roc_figure(scores_by_attack: Mapping[str, np.ndarray], labels: np.ndarray) -> Figure:
    """Log-log ROC of every attack with the chance diagonal."""
    y = np.asarray(labels)
    floor = 1.0 / max(1, int((y == 0).sum()))
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    for name, s in scores_by_attack.items():
        fpr, tpr = roc_points(y, s)
        ax.step(fpr, tpr, where="post", label=name)
    grid = np.logspace(np.log10(floor), 0, 50)
    ax.plot(grid, grid, "k--", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor / 2, 1)
    ax.set_ylim(floor / 2, 1.05)
    ax.set_xlabel("false positive rate (non-members flagged)")
    ax.set_ylabel("true positive rate (members flagged)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def _histogram(name: str, scores: np.ndarray, labels: np.ndarray) -> Figure:
    """Score densities of non-members and members, drawn from binned counts (40 bars each,
    whatever n)."""
    fig = Figure(figsize=(4.5, 3))
    ax = fig.add_subplot()
    bins = np.histogram_bin_edges(scores, bins=HISTOGRAM_BINS)
    for cls, label in ((0, "non-members"), (1, "members")):
        counts, _ = np.histogram(scores[labels == cls], bins=bins)
        ax.hist(bins[:-1], bins=bins, weights=counts, alpha=0.6, density=counts.sum() > 0,
                label=label)
    ax.set_title(name)
    ax.set_xlabel("score")
    ax.legend(fontsize=8)
    return fig


def thumbnail(data: bytes | None, size: int = 96) -> str | None:
    if not data:
        return None
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
        return data_uri(buf.getvalue(), "image/jpeg")
    except Exception:  # noqa: BLE001 - a broken image just gets no thumbnail
        return None


def _sample_fields(samples, n: int) -> tuple[Sequence[str], Sequence[bytes | None] | None,
                                              ImageLoader | None]:
    """Captions, image bytes and an image loader from a Features-like object or a mapping (or
    nothing); `samples` gives `image_bytes` (one per sample) or `image_loader` (called once
    with the rows the report shows) or neither."""
    if samples is None:
        return [""] * n, None, None
    get = samples.get if isinstance(samples, Mapping) else lambda k: getattr(samples, k, None)
    captions = get("captions")
    return ([""] * n if captions is None else captions), get("image_bytes"), get("image_loader")


def _interval(result: Mapping, key: str) -> tuple[float, float] | None:
    """`result["ci95"][key]` as (lo, hi) if it is a finite pair, else None."""
    ci = (result.get("ci95") or {}).get(key)
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return None
    ok = all(isinstance(v, numbers.Real) and math.isfinite(v) for v in ci)
    return (float(ci[0]), float(ci[1])) if ok else None


def _interval_text(result: Mapping, key: str, digits: int = 4) -> str | None:
    """The interval as "[lo, hi]", or None when there is no valid one."""
    ci = _interval(result, key)
    return None if ci is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def above_chance(result: Mapping) -> bool:
    """AUC clearly above 0.5: the 95 % interval excludes it (or, without one, AUC > 0.52)."""
    ci = _interval(result, "auc")
    return ci[0] > 0.5 if ci else (result.get("auc") or 0.5) > 0.5 + SHIFT_MARGIN


def shifted_attacks(results: Mapping[str, Mapping]) -> list[str]:
    """Attacks whose AUC a better-than-chance blind baseline matches or beats (± SHIFT_MARGIN)."""
    b = results.get(BLIND, {}).get("auc")
    if b is None or not above_chance(results[BLIND]):
        return []
    return [name for name, r in results.items()
            if name != BLIND and r.get("auc") is not None and b >= r["auc"] - SHIFT_MARGIN]


def shift_warnings(results: Mapping[str, Mapping]) -> list[str]:
    """Warnings for every attack whose AUC the blind baseline nearly matches or beats."""
    if BLIND not in results:
        return [
            (
                "The blind baseline was not run: distribution shift between members and "
                "non-members is unmeasured, so AUCs may reflect dataset differences."
            )
        ]
    b = results[BLIND]["auc"]
    return [
        f"Blind baseline AUC {b:.3f} >= {name} AUC {results[name]['auc']:.3f} - {SHIFT_MARGIN}: "
        f"members and non-members are separable without the model (distribution shift); {name} "
        "may not measure memorisation."
        for name in shifted_attacks(results)
    ]


def chance_notes(results: Mapping[str, Mapping]) -> list[str]:
    """One note per attack whose AUC interval includes chance (0.5)."""
    notes = []
    for name, r in results.items():
        if "auc" not in r or above_chance(r):
            continue
        ci = _interval_text(r, "auc", digits=3) or f"({NO_INTERVAL})"
        what = ("no member/non-member distribution shift detected" if name == BLIND
                else "this attack finds no membership signal here")
        notes.append(f"{name}: AUC {r['auc']:.3f} {ci} is not distinguishable "
                     f"from chance (0.5): {what}.")
    return notes


def resolution_notes(results: Mapping[str, Mapping]) -> list[str]:
    """Say which low-FPR metrics the evaluation set is too small to resolve."""
    notes = []
    counts = {int(r["n_nonmembers"]) for r in results.values() if r.get("n_nonmembers")}
    for n in sorted(counts):
        for name, fpr in LOW_FPRS.items():
            if n * fpr < 1:
                notes.append(
                    f"{name}: with {n} evaluation non-members the smallest non-zero FPR is "
                    f"1/{n} = {1 / n:.4f} > {fpr:g}, so this is the TPR at FPR 0, not an "
                    f"estimate at {fpr:.1%} FPR; it needs at least {math.ceil(1 / fpr)} "
                    "non-members."
                )
    return notes


def console_notes(results: Mapping[str, Mapping]) -> list[str]:
    """What a terminal summary must say beside the table: shift, chance, resolution, and
    thresholds too few calibration scores could set."""
    lines = []
    shifted = shifted_attacks(results)
    if shifted:
        lines.append(
            f"WARNING the blind baseline (no model; AUC {results[BLIND]['auc']:.3f}) matches or "
            f"beats {', '.join(shifted)}: members and non-members differ in distribution, so "
            "these AUCs do not measure memorisation alone")
    elif BLIND not in results:
        lines += shift_warnings(results)
    return lines + chance_notes(results) + resolution_notes(results) + threshold_notes(results)


def _fmt(v) -> str:
    """A value for the page: ints as they are, floats to 4 places, ±inf as such, NaN/None n/a."""
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:+}" if math.isinf(v) else f"{v:.4f}"
    return str(v)


def threshold_notes(results: Mapping[str, Mapping]) -> list[str]:
    """Explain an infinite threshold: too few calibration scores for the target FPR."""
    notes = []
    for name, r in results.items():
        t, f, n = r.get("threshold"), r.get("target_fpr"), r.get("n_calibration")
        if t == math.inf and f and n is not None:
            notes.append(
                f"{name}: threshold +inf: {n} calibration non-members cannot certify a "
                f"{f:.1%} FPR (that needs at least {math.ceil(1 / f) - 1}), so nobody is flagged "
                "and TPR at threshold is 0 by construction."
            )
    return notes


def _cell(result: Mapping, key: str) -> dict[str, str | None]:
    """One table cell: the value and, for metrics that carry one, its interval text."""
    interval = None
    if key in INTERVAL_METRICS:
        present = key in (result.get("ci95") or {})
        interval = _interval_text(result, key) or (NO_INTERVAL if present else "interval n/a")
    return {"value": _fmt(result.get(key)), "interval": interval}


def _ci_methods(results: Mapping[str, Mapping], columns: tuple[tuple[str, str], ...]) -> str:
    """Which interval method each column's brackets use, read from every attack's ci_method."""
    parts = []
    for heading, key in columns:
        if key not in INTERVAL_METRICS:
            continue
        found = {(r.get("ci_method") or {}).get(key) for r in results.values()} - {None}
        names = sorted(CI_METHOD_NAMES.get(m, str(m)) for m in found)
        parts.append(f"{heading}: {' / '.join(names) or 'method not recorded'}")
    return "; ".join(parts)


def _table(results: Mapping[str, Mapping], columns: tuple[tuple[str, str], ...]) -> dict:
    """Headings, interval methods and one row of cells (and counts) per attack, for the template."""
    rows = [
        {
            "attack": name,
            "cells": [_cell(r, key) for _, key in columns],
            "counts": f"{_fmt(r.get('n_members'))} / {_fmt(r.get('n_nonmembers'))}",
        }
        for name, r in results.items()
    ]
    return {"headings": [h for h, _ in columns], "methods": _ci_methods(results, columns),
            "rows": rows}


def top_rows(scores: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """The k highest-scoring rows, best first (ties: lower row first), in O(n)."""
    if scores.size <= k:
        return np.argsort(-scores, kind="stable")
    kth = np.partition(scores, scores.size - k)[scores.size - k]
    candidates = np.flatnonzero(scores >= kth)
    return candidates[np.argsort(-scores[candidates], kind="stable")[:k]]


def _images_of(rows: np.ndarray, image_bytes, image_loader) -> dict[int, bytes | None]:
    """The encoded images of `rows`: from image_bytes, or one call of image_loader."""
    wanted = sorted({int(i) for i in rows})
    if image_bytes is not None:
        return {i: image_bytes[i] for i in wanted}
    if image_loader is None or not wanted:
        return {}
    loaded = list(image_loader(wanted))
    if len(loaded) != len(wanted):
        raise ValueError(f"image_loader returned {len(loaded)} images for {len(wanted)} rows")
    return dict(zip(wanted, loaded, strict=True))


def _top_samples(name, scores, order, labels, keys, captions, images) -> dict:
    """The rows `order` of one attack (its TOP_K), as plain values for the template."""
    rows = [
        {
            "thumb": thumbnail(images.get(int(i))),
            "key": str(keys[i]),
            "score": f"{scores[i]:.4f}",
            "label": "member" if labels[i] == 1 else "non-member",
            "caption": str(captions[i]),
        }
        for i in order
    ]
    return {"attack": name, "rows": rows}


@functools.cache
def template(name: str = TEMPLATE) -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mmia", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template(name)


def render_html(results, scores_by_attack, labels, keys, provenance, samples, roc_png) -> str:
    """The self-contained report (all images embedded as data URIs, no external resources)."""
    y = np.asarray(labels)
    captions, image_bytes, image_loader = _sample_fields(samples, len(y))
    arrays = {n: np.asarray(s, float) for n, s in scores_by_attack.items()}
    orders = {n: top_rows(s) for n, s in arrays.items()}
    images = _images_of(np.concatenate([np.arange(0), *orders.values()]), image_bytes,
                        image_loader)
    return template().render(
        warnings=shift_warnings(results),
        notes=chance_notes(results) + resolution_notes(results) + threshold_notes(results),
        no_interval=NO_INTERVAL,
        roc_table=_table(results, ROC_COLUMNS),
        decision_table=_table(results, DECISION_COLUMNS),
        roc_uri=data_uri(roc_png),
        histograms=[(n, data_uri(png(_histogram(n, s, y)))) for n, s in arrays.items()],
        top_k=TOP_K,
        tops=[_top_samples(n, s, orders[n], y, keys, captions, images)
              for n, s in arrays.items()],
        provenance=json.dumps(jsonable(provenance), indent=2, sort_keys=True),
    )


def write_outputs(
    out_dir: str | Path,
    results: Mapping[str, Mapping],
    scores_by_attack: Mapping[str, np.ndarray],
    labels: np.ndarray,
    keys: list[str],
    provenance: Mapping,
    samples=None,
) -> dict[str, Path]:
    """Write metrics.json, scores.csv, roc.png and report.html into `out_dir`; return paths.

    The files are written to a hidden folder inside `out_dir` and renamed into place together,
    so an interrupted or failed write (Ctrl-C, disk full) leaves the previous outputs intact; a
    failure is one-line MmiaError.

    results: attack name -> `mmia.metrics.evaluate` dict. provenance: dicts such as "model",
    "data", "versions", "seeds", "command" (each becomes a top-level key of metrics.json).
    samples: optional Features or mapping with "captions" and either "image_bytes" (one per
    sample) or "image_loader" (a callable: sorted row indices -> their encoded images, called
    once with the union of every attack's top rows) for the report's thumbnails.
    """
    y = np.asarray(labels)
    n = len(y)
    if len(keys) != n or any(len(np.asarray(s)) != n for s in scores_by_attack.values()):
        raise ValueError("keys, labels and every attack's scores must have the same length")
    return write_together(out_dir, OUTPUTS, lambda staging: _write_all(
        staging, results, scores_by_attack, y, keys, provenance, samples))


def write_together(out_dir: str | Path, names: tuple[str, ...],
                   write_into: Callable[[Path], None]) -> dict[str, Path]:
    """Have `write_into(folder)` write the files `names` into a hidden folder inside
    `out_dir`, then rename them into place one after another; return their paths. A failure
    before the renames leaves the previous outputs intact; a failure is one-line MmiaError."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".mmia-writing-", dir=out))
    except OSError as exc:
        raise MmiaError(f"cannot write the outputs to {str(out)!r} ({exc.strerror or exc}): "
                        "pass a writable --out") from None
    try:  # all are written aside first, then renamed into place one by one
        write_into(staging)
        for name in names:
            os.replace(staging / name, out / name)
    except OSError as exc:
        raise MmiaError(f"could not write the outputs to {str(out)!r} ({exc.strerror or exc}); "
                        "the previous outputs there are unchanged") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: out / name for name in names}


def _write_all(folder: Path, results, scores_by_attack, y, keys, provenance, samples) -> None:
    """The four output files, written into `folder`."""
    doc = {"attacks": jsonable(results), "model": {}, "data": {}}
    doc.update({k: jsonable(v) for k, v in provenance.items() if k != "attacks"})
    doc["shift_warnings"] = shift_warnings(results)
    doc["resolution_notes"] = resolution_notes(results)
    doc["chance_notes"] = chance_notes(results)
    doc["threshold_notes"] = threshold_notes(results)
    (folder / "metrics.json").write_text(json.dumps(doc, indent=2, allow_nan=False))

    write_scores_csv(folder / "scores.csv", keys, y, scores_by_attack)
    roc_png = png(roc_figure(scores_by_attack, y))
    (folder / "roc.png").write_bytes(roc_png)
    page = render_html(results, scores_by_attack, y, keys, provenance, samples, roc_png)
    (folder / "report.html").write_text(page, encoding="utf-8")


def _csv_field(text: str) -> str:
    """`text` as csv.writer's QUOTE_MINIMAL writes it."""
    return '"' + text.replace('"', '""') + '"' if CSV_NEEDS_QUOTES.search(text) else text


def csv_fields(texts) -> pa.Array:
    """`_csv_field` of each text, in Arrow (no Python per text)."""
    try:
        text = pa.array(np.asarray(texts, dtype=object))
    except (pa.ArrowException, TypeError):
        text = None
    if text is None or text.type != pa.string() or text.null_count:  # as str() writes them
        text = pa.array([str(t) for t in texts], type=pa.string())
    quoted = pc.binary_join_element_wise('"', pc.replace_substring(text, '"', '""'), '"', "")
    return pc.if_else(pc.match_substring_regex(text, CSV_NEEDS_QUOTES.pattern), quoted, text)


def float_text(values: np.ndarray) -> pa.Array:
    """repr() of each float64 as an Arrow string array: Arrow's shortest round-trip cast, with
    Python's own repr where the two notations may differ (integral values, |v| < 1e-4, >= 1e9)."""
    text = pc.cast(pa.array(values, type=pa.float64()), pa.string())
    size = np.abs(values)
    odd = ((size < 1e-4) & (size > 0)) | (size >= 1e9) | (values == np.trunc(values))
    if not odd.any():
        return text
    fixed = pa.array([repr(v) for v in values[odd].tolist()], type=pa.string())
    return pc.replace_with_mask(text, pa.array(odd), fixed)


def write_scores_csv(path: Path, keys, labels: np.ndarray,
                     scores_by_attack: Mapping[str, np.ndarray]) -> None:
    """scores.csv: `key,label,attack,score` rows (score as repr of the float), CRLF line ends,
    byte for byte what csv.writer wrote; rows are formatted in Arrow, CSV_ROWS_PER_WRITE at a
    time."""
    key_text = csv_fields(keys)
    label_text = pc.cast(pa.array(np.asarray(labels).astype(np.int64)), pa.string())
    nothing = pa.scalar("", pa.string())
    with path.open("wb") as f:
        f.write(b"key,label,attack,score\r\n")
        for name, s in scores_by_attack.items():
            attack = pa.scalar(_csv_field(str(name)), pa.string())
            values = np.asarray(s, float)
            for start in range(0, len(values), CSV_ROWS_PER_WRITE):
                stop = start + CSV_ROWS_PER_WRITE
                rows = pc.binary_join_element_wise(
                    key_text[start:stop], label_text[start:stop], attack,
                    float_text(values[start:stop]), ",")
                f.write(_string_bytes(pc.binary_join_element_wise(rows, nothing, "\r\n")))


def _string_bytes(text: pa.Array) -> memoryview:
    """The characters of every string of a null-free Arrow string array, back to back."""
    offsets = np.frombuffer(text.buffers()[1], dtype=np.int32)[text.offset:]
    return memoryview(text.buffers()[2])[int(offsets[0]):int(offsets[len(text)])]
