"""Audit outputs: metrics.json, scores.csv, roc.png and a self-contained report.html."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from mmia.metrics import LOW_FPRS

BLIND = "blind"
SHIFT_MARGIN = 0.02
TOP_K = 10
TABLE_METRICS = ("auc", "tpr@1%fpr", "tpr@0.1%fpr", "balanced_accuracy", "advantage")


def _jsonable(obj):
    """Convert numpy scalars/arrays and non-finite floats into JSON-safe values."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def roc_figure(scores_by_attack: Mapping[str, np.ndarray], labels: np.ndarray) -> Figure:
    """Log-log ROC of every attack with the chance diagonal."""
    y = np.asarray(labels)
    floor = 1.0 / max(1, int((y == 0).sum()))
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    for name, s in scores_by_attack.items():
        fpr, tpr, _ = roc_curve(y, np.asarray(s, float), pos_label=1)
        ok = (fpr > 0) & (tpr > 0)
        ax.step(fpr[ok], tpr[ok], where="post", label=name)
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
    fig = Figure(figsize=(4.5, 3))
    ax = fig.add_subplot()
    bins = np.histogram_bin_edges(scores, bins=40)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, density=True, label="non-members")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, density=True, label="members")
    ax.set_title(name)
    ax.set_xlabel("score")
    ax.legend(fontsize=8)
    return fig


def _thumbnail(data: bytes | None, size: int = 96) -> str | None:
    if not data:
        return None
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
        return _data_uri(buf.getvalue(), "image/jpeg")
    except Exception:  # noqa: BLE001 - a broken image just gets no thumbnail
        return None


def _sample_fields(samples, n: int) -> tuple[list[str], list[bytes | None]]:
    """Captions and image bytes from a Features-like object or a mapping (or nothing)."""
    if samples is None:
        return [""] * n, [None] * n
    get = samples.get if isinstance(samples, Mapping) else lambda k: getattr(samples, k, None)
    captions = get("captions") or [""] * n
    image_bytes = get("image_bytes") or [None] * n
    return list(captions), list(image_bytes)


def above_chance(result: Mapping) -> bool:
    """AUC clearly above 0.5: the 95 % interval excludes it (or, without one, AUC > 0.52)."""
    ci = result.get("ci95", {}).get("auc")
    return ci[0] > 0.5 if ci else result.get("auc", 0.5) > 0.5 + SHIFT_MARGIN


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
        lo, hi = r.get("ci95", {}).get("auc", (float("nan"), float("nan")))
        what = ("no member/non-member distribution shift detected" if name == BLIND
                else "this attack finds no membership signal here")
        notes.append(f"{name}: AUC {r['auc']:.3f} [{lo:.3f}, {hi:.3f}] is not distinguishable "
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
    """What a terminal summary must say beside the table: shift, chance, resolution."""
    lines = []
    shifted = shifted_attacks(results)
    if shifted:
        lines.append(
            f"WARNING the blind baseline (no model; AUC {results[BLIND]['auc']:.3f}) matches or "
            f"beats {', '.join(shifted)}: members and non-members differ in distribution, so "
            "these AUCs do not measure memorisation alone")
    elif BLIND not in results:
        lines += shift_warnings(results)
    return lines + chance_notes(results) + resolution_notes(results)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _metrics_table(results: Mapping[str, Mapping]) -> str:
    head = "".join(f"<th>{html.escape(m)}</th>" for m in TABLE_METRICS)
    rows = []
    for name, r in results.items():
        cells = []
        for m in TABLE_METRICS:
            ci = r.get("ci95", {}).get(m)
            ci_txt = f"<br><small>[{_fmt(ci[0])}, {_fmt(ci[1])}]</small>" if ci else ""
            cells.append(f"<td>{_fmt(r.get(m))}{ci_txt}</td>")
        extra = (
            f"<td>{_fmt(r.get('threshold'))}</td><td>{_fmt(r.get('achieved_fpr'))}</td>"
            f"<td>{html.escape(str(r.get('threshold_source', '')))}</td>"
            f"<td>{r.get('n_members', '')} / {r.get('n_nonmembers', '')}</td>"
        )
        rows.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}{extra}</tr>")
    return (
        f"<table><tr><th>attack</th>{head}<th>threshold</th><th>achieved FPR</th>"
        f"<th>threshold source</th><th>members / non-members</th></tr>{''.join(rows)}</table>"
    )


def _top_samples(name, scores, labels, keys, captions, image_bytes) -> str:
    order = np.argsort(-scores, kind="stable")[:TOP_K]
    rows = []
    for i in order:
        thumb = _thumbnail(image_bytes[i])
        img = f'<img src="{thumb}" alt="">' if thumb else ""
        who = "member" if labels[i] == 1 else "non-member"
        rows.append(
            f"<tr><td>{img}</td><td>{html.escape(str(keys[i]))}</td><td>{scores[i]:.4f}</td>"
            f"<td>{who}</td><td>{html.escape(str(captions[i]))}</td></tr>"
        )
    return (
        f"<h3>{html.escape(name)}: top {TOP_K}</h3><table><tr><th></th><th>key</th>"
        f"<th>score</th><th>label</th><th>caption</th></tr>{''.join(rows)}</table>"
    )


CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:left;vertical-align:top}.warn{background:#fdecea;border:2px solid #c62828;
padding:1em;margin:1em 0;font-weight:bold}.note{color:#555}pre{background:#f5f5f5;
padding:1em;overflow:auto}img{max-width:96px}"""


def _wide_img(png: bytes, alt: str) -> str:
    return f'<img style="max-width:none" src="{_data_uri(png)}" alt="{html.escape(alt)}">'


def render_html(results, scores_by_attack, labels, keys, provenance, samples, roc_png) -> str:
    """The self-contained report (all images embedded as data URIs, no external resources)."""
    y = np.asarray(labels)
    captions, image_bytes = _sample_fields(samples, len(y))
    warns = "".join(
        f'<div class="warn">&#9888; {html.escape(w)}</div>' for w in shift_warnings(results)
    )
    notes = chance_notes(results) + resolution_notes(results)
    notes_html = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    hists = "".join(
        _wide_img(_png(_histogram(n, np.asarray(s, float), y)), f"{n} histogram")
        for n, s in scores_by_attack.items()
    )
    tops = "".join(
        _top_samples(n, np.asarray(s, float), y, keys, captions, image_bytes)
        for n, s in scores_by_attack.items()
    )
    prov = html.escape(json.dumps(_jsonable(provenance), indent=2, sort_keys=True))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>mmia membership-inference audit</title>
<style>{CSS}</style></head><body>
<h1>Membership-inference audit</h1>
{warns}
<h2>Metrics</h2>
<p class="note">Member = positive class. Thresholded metrics use a threshold calibrated at the
target FPR (on known non-members unless the source says otherwise); the achieved FPR is
measured on the evaluation non-members. Brackets: stratified-bootstrap 95 % intervals.</p>
{_metrics_table(results)}
{notes_html}
<h2>ROC (log-log)</h2>
{_wide_img(roc_png, "ROC curves")}
<h2>Score distributions</h2>
{hists}
<h2>Highest-scoring samples</h2>
{tops}
<h2>Provenance</h2>
<pre>{prov}</pre>
</body></html>
"""


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

    results: attack name -> `mmia.metrics.evaluate` dict. provenance: dicts such as "model",
    "data", "versions", "seeds", "command" (each becomes a top-level key of metrics.json).
    samples: optional Features or mapping with "captions" and "image_bytes" for the report.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    y = np.asarray(labels)
    n = len(y)
    if len(keys) != n or any(len(np.asarray(s)) != n for s in scores_by_attack.values()):
        raise ValueError("keys, labels and every attack's scores must have the same length")
    paths = {name: out / name for name in ("metrics.json", "scores.csv", "roc.png", "report.html")}

    doc = {"attacks": _jsonable(results), "model": {}, "data": {}}
    doc.update({k: _jsonable(v) for k, v in provenance.items() if k != "attacks"})
    doc["shift_warnings"] = shift_warnings(results)
    doc["resolution_notes"] = resolution_notes(results)
    doc["chance_notes"] = chance_notes(results)
    paths["metrics.json"].write_text(json.dumps(doc, indent=2, allow_nan=False))

    with paths["scores.csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "label", "attack", "score"])
        for name, s in scores_by_attack.items():
            for k, lab, v in zip(keys, y, np.asarray(s, float), strict=True):
                w.writerow([k, int(lab), name, repr(float(v))])

    roc_png = _png(roc_figure(scores_by_attack, y))
    paths["roc.png"].write_bytes(roc_png)
    page = render_html(results, scores_by_attack, y, keys, provenance, samples, roc_png)
    paths["report.html"].write_text(page, encoding="utf-8")
    return paths
