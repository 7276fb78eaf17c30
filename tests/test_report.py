"""Report outputs: four files, schema, self-contained and escaped HTML."""

import csv
import io
import json
import math
import re

import numpy as np
import pytest

from mmia.report import (
    TOP_K,
    above_chance,
    chance_notes,
    render_html,
    shift_warnings,
    shifted_attacks,
    write_outputs,
)

ROC_HEADING = "ROC on the evaluation set (oracle thresholds)"
DECISION_HEADING = "Calibrated decision (threshold from known non-members)"


def _jpeg(color):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buf, format="JPEG")
    return buf.getvalue()


def _result(auc: float, auc_ci: list[float] | None, ci: dict | None = None, **fields) -> dict:
    """A hand-built dict shaped like `mmia.metrics.evaluate`'s; `ci` overrides ci95 entries."""
    r = {
        "auc": auc, "tpr@1%fpr": 0.05, "tpr@0.1%fpr": 0.0125,
        "threshold": 0.8123, "threshold_source": "known_nonmembers", "target_fpr": 0.01,
        "n_calibration": 200, "tpr_at_threshold": 0.1, "achieved_fpr": 0.025,
        "balanced_accuracy": 0.5375, "advantage": 0.075, "n_members": 40, "n_nonmembers": 40,
        "ci95": {"auc": auc_ci, "tpr@1%fpr": None, "tpr@0.1%fpr": None,
                 "tpr_at_threshold": [0.0279, 0.2366], "achieved_fpr": [0.0006, 0.1316]},
        "ci_method": {"auc": "delong", "tpr@1%fpr": "bootstrap", "tpr@0.1%fpr": "bootstrap",
                      "tpr_at_threshold": "clopper-pearson", "achieved_fpr": "clopper-pearson"},
    }
    r["ci95"].update(ci or {})
    r.update(fields)
    return r


def _section(page: str, heading: str) -> str:
    """The page from `<h2>heading</h2>` up to the next <h2>."""
    start = page.index(f"<h2>{heading}</h2>")
    end = page.find("<h2>", start + 1)
    return page[start:end if end >= 0 else None]


def _cells(page: str, heading: str, attack: str) -> list[str]:
    """Tag-free text of each <td> in the attack's row of the table under `heading`."""
    row = re.search(rf"<tr><th>{re.escape(attack)}</th>(.*?)</tr>", _section(page, heading), re.S)
    assert row, f"no {attack} row under {heading}"
    return [" ".join(re.sub(r"<[^>]+>", " ", td).split())
            for td in re.findall(r"<td>(.*?)</td>", row.group(1), re.S)]


@pytest.fixture
def audit():
    rng = np.random.default_rng(0)
    n = 40
    y = np.r_[np.ones(n), np.zeros(n)].astype(int)
    scores = {
        "csa": rng.normal(size=2 * n) + 0.5 * y,
        "wsa": rng.uniform(size=2 * n),
        "blind": rng.normal(size=2 * n) + 2.0 * y,  # strong shift: should trigger warnings
    }
    scores["csa"][0] = 10.0  # the sample with the hostile caption is in the top 10
    results = {
        "csa": _result(0.66, [0.54, 0.77], ci={"tpr@1%fpr": [0.0, 0.15]}),
        "wsa": _result(0.51, [0.38, 0.64]),
        "blind": _result(0.95, [0.89, 0.98], ci={"achieved_fpr": None}, n_calibration=40,
                         threshold_source="evaluation_nonmembers"),
    }
    keys = [f"{i:09d}" for i in range(2 * n)]
    captions = [f"caption {i}" for i in range(2 * n)]
    captions[0] = '<script>alert("x")</script> & <b>'
    samples = {"captions": captions, "image_bytes": [_jpeg((i * 3, 50, 90)) for i in range(2 * n)]}
    prov = {
        "model": {"name": "ViT-B-32", "fingerprint": "abc123"},
        "data": {"members": "shards/{00000..00001}.tar"},
        "versions": {"mmia": "0.1.0"},
        "seeds": {"bootstrap": 0},
        "command": "mmia audit --config x.yaml",
    }
    return y, scores, results, keys, samples, prov


def test_write_outputs_files_and_schema(tmp_path, audit):
    y, scores, results, keys, samples, prov = audit
    paths = write_outputs(tmp_path / "out", results, scores, y, keys, prov, samples=samples)
    for name in ("metrics.json", "scores.csv", "roc.png", "report.html"):
        assert (tmp_path / "out" / name).is_file() and paths[name].is_file()

    doc = json.loads(paths["metrics.json"].read_text())
    assert set(doc["attacks"]) == {"csa", "wsa", "blind"}
    for r in doc["attacks"].values():
        assert r.keys() == _result(0.5, None).keys()
        assert len(r["ci95"]["auc"]) == 2
    assert doc["attacks"]["blind"]["ci95"]["achieved_fpr"] is None
    assert doc["model"]["fingerprint"] == "abc123" and doc["data"]["members"]
    assert doc["command"].startswith("mmia")

    rows = list(csv.DictReader(paths["scores.csv"].open()))
    assert list(rows[0]) == ["key", "label", "attack", "score"]
    assert len(rows) == 3 * len(y)
    assert rows[0]["key"] == "000000000" and rows[0]["label"] == "1"
    assert float(rows[0]["score"]) == pytest.approx(scores["csa"][0])

    assert paths["roc.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    page = paths["report.html"].read_text()
    assert "http" not in page.lower().replace("http-equiv", "")
    assert "<link" not in page and "<script" not in page  # self-contained
    assert 'src="data:image/png;base64,' in page and 'src="data:image/jpeg;base64,' in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "distribution shift" in page and 'class="warn"' in page
    assert "abc123" in page and "mmia audit --config x.yaml" in page


def test_shift_warning_rule():
    assert shift_warnings({"csa": {"auc": 0.70}, "blind": {"auc": 0.69}})  # within 0.02
    assert not shift_warnings({"csa": {"auc": 0.70}, "blind": {"auc": 0.60}})
    assert shift_warnings({"csa": {"auc": 0.70}})  # blind not run is flagged too
    both = {"csa": {"auc": 0.70}, "aea": {"auc": 0.60}, "wsa": {"auc": 0.64},
            "blind": {"auc": 0.62}}
    assert shifted_attacks(both) == ["aea", "wsa"]
    assert len(shift_warnings(both)) == 2 and "wsa AUC 0.640" in shift_warnings(both)[1]
    # a blind baseline that is itself at chance says nothing about shift, whatever it beats
    chance = {"wsa": {"auc": 0.49, "ci95": {"auc": [0.45, 0.54]}},
              "blind": {"auc": 0.51, "ci95": {"auc": [0.47, 0.56]}}}
    assert shifted_attacks(chance) == [] and shift_warnings(chance) == []
    chance["blind"]["ci95"]["auc"] = [0.505, 0.56]
    assert shifted_attacks(chance) == ["wsa"]


def test_chance_notes_name_attacks_whose_interval_holds_one_half():
    results = {"csa": {"auc": 0.84, "ci95": {"auc": [0.81, 0.87]}},
               "wsa": {"auc": 0.499, "ci95": {"auc": [0.453, 0.545]}},
               "blind": {"auc": 0.511, "ci95": {"auc": [0.465, 0.556]}}}
    notes = chance_notes(results)
    assert [n.split(":")[0] for n in notes] == ["wsa", "blind"]
    assert "[0.453, 0.545]" in notes[0] and "no member/non-member distribution shift" in notes[1]
    # without a valid AUC interval (None), fall back to the margin and say there is none
    assert above_chance({"auc": 0.60, "ci95": {"auc": None}})
    no_ci = {"wsa": {"auc": 0.51, "ci95": {"auc": None}}}
    assert not above_chance(no_ci["wsa"])
    assert chance_notes(no_ci) == ["wsa: AUC 0.510 (no valid interval) is not distinguishable "
                                   "from chance (0.5): this attack finds no membership signal "
                                   "here."]


def test_thumbnails_only_with_samples(tmp_path, audit):
    y, scores, results, keys, samples, prov = audit
    page = write_outputs(tmp_path, results, scores, y, keys, prov)["report.html"].read_text()
    assert "data:image/jpeg" not in page and 'src="data:image/png;base64,' in page
    page = write_outputs(tmp_path, results, scores, y, keys, prov, samples)["report.html"]
    assert page.read_text().count('src="data:image/jpeg;base64,') == TOP_K * len(scores)
    with pytest.raises(ValueError):
        write_outputs(tmp_path, results, scores, y, keys[:-1], prov)


@pytest.fixture
def page(audit) -> str:
    y, scores, results, keys, samples, prov = audit
    return render_html(results, scores, y, keys, prov, samples, roc_png=b"")


def test_roc_and_decision_tables_are_separate(page):
    roc, decision = _section(page, ROC_HEADING), _section(page, DECISION_HEADING)
    assert page.index(ROC_HEADING) < page.index(DECISION_HEADING)
    assert re.findall(r"<th>([^<]*)</th>", roc)[:4] == ["attack", "AUC", "TPR@1%FPR",
                                                        "TPR@0.1%FPR"]
    assert re.findall(r"<th>([^<]*)</th>", decision)[:9] == [
        "attack", "target FPR", "threshold", "threshold source", "n_calibration",
        "TPR at threshold", "achieved FPR", "balanced accuracy", "members / non-members"]
    assert "TPR at threshold" not in roc and "<th>AUC</th>" not in decision
    # each table says which interval method its brackets use, read from ci_method
    assert "AUC: DeLong" in roc and "TPR@1%FPR: stratified bootstrap" in roc
    assert "TPR at threshold: exact Clopper-Pearson" in decision and "DeLong" not in decision


def test_intervals_render_numbers_or_no_valid_interval(page):
    assert _cells(page, ROC_HEADING, "csa") == [
        "0.6600 [0.5400, 0.7700]", "0.0500 [0.0000, 0.1500]", "0.0125 no valid interval"]
    assert _cells(page, DECISION_HEADING, "blind") == [
        "0.0100", "0.8123", "evaluation_nonmembers", "40", "0.1000 [0.0279, 0.2366]",
        "0.0250 no valid interval", "0.5375", "40 / 40"]
    assert "n/a, n/a" not in page and "None" not in page


def test_missing_keys_and_infinite_threshold(audit):
    y, scores, _, keys, _, prov = audit
    results = {"csa": {"auc": 0.7}, "wsa": _result(0.6, None, threshold=math.inf,
                                                     n_calibration=50)}
    page = render_html(results, {"csa": scores["csa"], "wsa": scores["wsa"]}, y, keys, prov,
                       None, roc_png=b"")
    assert _cells(page, ROC_HEADING, "csa") == ["0.7000 interval n/a", "n/a interval n/a",
                                                "n/a interval n/a"]
    assert _cells(page, DECISION_HEADING, "csa")[-1] == "n/a / n/a"
    assert _cells(page, ROC_HEADING, "wsa")[0] == "0.6000 no valid interval"
    assert _cells(page, DECISION_HEADING, "wsa")[1] == "+inf"
    assert "wsa: threshold +inf: 50 calibration non-members cannot certify a 1.0% FPR" in page


def test_resolution_notes_flag_low_fprs_the_set_cannot_resolve(tmp_path, audit):
    from mmia.report import resolution_notes

    def notes(n_nonmembers):
        return resolution_notes({"csa": {"n_nonmembers": n_nonmembers}})

    assert len(notes(300)) == 1 and notes(300)[0].startswith("tpr@0.1%fpr")
    assert "1/300" in notes(300)[0] and "1000" in notes(300)[0]
    assert [n.split(":")[0] for n in notes(50)] == ["tpr@1%fpr", "tpr@0.1%fpr"]
    assert notes(1000) == []
    y, scores, results, keys, samples, prov = audit  # 40 non-members: both notes, everywhere
    paths = write_outputs(tmp_path, results, scores, y, keys, prov, samples=samples)
    doc = json.loads(paths["metrics.json"].read_text())
    assert doc["resolution_notes"] == notes(40)
    assert "1/40" in paths["report.html"].read_text()


def _previous_outputs(out) -> dict[str, bytes]:
    out.mkdir()
    old = {name: f"previous run's {name}".encode() for name in
           ("metrics.json", "scores.csv", "roc.png", "report.html")}
    for name, data in old.items():
        (out / name).write_bytes(data)
    return old


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_an_interrupted_write_leaves_the_previous_outputs_whole(tmp_path, audit, monkeypatch,
                                                                failure):
    import mmia.report
    from mmia.errors import MmiaError

    y, scores, results, keys, samples, prov = audit
    out = tmp_path / "out"
    old = _previous_outputs(out)

    def fail(*args, **kwargs):  # the report is rendered after metrics.json and scores.csv
        raise failure

    monkeypatch.setattr(mmia.report, "render_html", fail)
    expected = MmiaError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as err:
        write_outputs(out, results, scores, y, keys, prov, samples=samples)
    if expected is MmiaError:
        assert "previous outputs there are unchanged" in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old  # nothing new, nothing left


# --- scale: csv writer, thinned ROC, O(n) top rows, thumbnails re-read for the top rows only


def test_scores_csv_is_byte_for_byte_what_csv_writer_wrote(tmp_path):
    from mmia.report import write_scores_csv

    keys = ["plain", "with,comma", 'with "quotes"', "line\nbreak", "cr\rhere", "ünï", "", "x y"]
    y = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    scores = {"csa": np.array([0.1, 1e-05, 1.0, -0.0, 123456789.0, 1e16, 0.30000001192092896,
                               np.float32(0.7)]),
              "a,b": np.linspace(0, 1, 8, dtype=np.float32)}
    write_scores_csv(tmp_path / "fast.csv", keys, y, scores)
    with (tmp_path / "slow.csv").open("w", newline="") as f:  # what write_outputs used to do
        w = csv.writer(f)
        w.writerow(["key", "label", "attack", "score"])
        for name, s in scores.items():
            for k, lab, v in zip(keys, y, np.asarray(s, float), strict=True):
                w.writerow([k, int(lab), name, repr(float(v))])
    assert (tmp_path / "fast.csv").read_bytes() == (tmp_path / "slow.csv").read_bytes()


def test_csv_fields_quote_in_arrow_as_csv_field_does():
    from mmia.report import _csv_field, csv_fields

    for keys in (["plain", 'a"b', "c,d", "e\rf", "g\nh", "", "ünï,"],
                 ["plain", 7, None, b"by,tes", "x"], [b"ab", b"c"], []):
        assert csv_fields(keys).to_pylist() == [_csv_field(str(k)) for k in keys]


def _step(fpr, tpr, grid):
    """TPR of the post-step ROC curve through (fpr, tpr) at each FPR of grid."""
    return tpr[np.searchsorted(fpr, grid, side="right") - 1]


def test_thinned_roc_keeps_low_fpr_points_and_the_drawn_curve():
    from sklearn.metrics import roc_curve

    from mmia.report import ROC_CELLS_PER_DECADE, ROC_KEEP_FPR, roc_points

    rng = np.random.default_rng(0)
    y = (rng.random(200_000) < 0.5).astype(int)
    s = rng.normal(size=y.size) + 0.5 * y
    fpr, tpr, _ = roc_curve(y, s)
    ok = (fpr > 0) & (tpr > 0)
    fpr, tpr = fpr[ok], tpr[ok]
    thin_fpr, thin_tpr = roc_points(y, s)
    assert len(thin_fpr) < len(fpr) / 4
    low = fpr <= ROC_KEEP_FPR
    np.testing.assert_array_equal(thin_fpr[thin_fpr <= ROC_KEEP_FPR], fpr[low])
    np.testing.assert_array_equal(thin_tpr[thin_fpr <= ROC_KEEP_FPR], tpr[low])
    assert thin_fpr[-1] == fpr[-1] and thin_tpr[-1] == tpr[-1]
    grid = np.logspace(np.log10(fpr[0]), 0, 100_000)
    gap = np.abs(np.log10(_step(thin_fpr, thin_tpr, grid)) - np.log10(_step(fpr, tpr, grid)))
    assert gap.max() <= 1.0 / ROC_CELLS_PER_DECADE + 1e-12  # within one cell of a 1/1000 decade


def test_top_rows_are_the_stable_argsort_head():
    from mmia.report import top_rows

    rng = np.random.default_rng(0)
    s = rng.integers(0, 20, size=5000).astype(float)  # many ties at the top
    np.testing.assert_array_equal(top_rows(s), np.argsort(-s, kind="stable")[:TOP_K])
    np.testing.assert_array_equal(top_rows(s[:4]), np.argsort(-s[:4], kind="stable"))


def test_thumbnails_come_from_one_image_loader_call_for_the_top_rows(tmp_path, audit):
    y, scores, results, keys, samples, prov = audit
    images = samples["image_bytes"]
    calls = []

    def loader(rows):
        calls.append(list(rows))
        return [None if r % 2 else images[r] for r in rows]  # odd rows unreadable

    lazy = {"captions": samples["captions"], "image_loader": loader}
    page = write_outputs(tmp_path, results, scores, y, keys, prov, lazy)["report.html"]
    tops = {int(i) for s in scores.values() for i in np.argsort(-s, kind="stable")[:TOP_K]}
    assert calls == [sorted(tops)]
    shown = sum(1 for s in scores.values() for i in np.argsort(-s, kind="stable")[:TOP_K]
                if i % 2 == 0)
    assert page.read_text().count('src="data:image/jpeg;base64,') == shown > 0


def test_float_text_is_python_repr_at_every_magnitude():
    from mmia.report import float_text

    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.normal(size=100_000) * 10.0 ** rng.integers(-12, 20, size=100_000),
        rng.random(20_000).astype(np.float32).astype(float), np.arange(-5.0, 5.0),
        [0.0, -0.0, 1e-4, -1e-4, 1e9, 1e16, 9999999999999998.0, 5e-324, 1.7976931348623157e308]])
    assert float_text(values).to_pylist() == [repr(v) for v in values.tolist()]
