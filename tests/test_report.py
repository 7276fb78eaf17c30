"""Report outputs: four files, schema, self-contained and escaped HTML."""

import csv
import io
import json

import numpy as np
import pytest

from mmia.metrics import evaluate
from mmia.report import chance_notes, shift_warnings, shifted_attacks, write_outputs


def _jpeg(color):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buf, format="JPEG")
    return buf.getvalue()


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
    known = {"csa": rng.normal(size=50), "wsa": rng.uniform(size=50), "blind": None}
    results = {k: evaluate(y, s, known[k], n_bootstrap=50) for k, s in scores.items()}
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
        for k in (
            "auc",
            "tpr@1%fpr",
            "tpr@0.1%fpr",
            "balanced_accuracy",
            "advantage",
            "n_members",
            "n_nonmembers",
            "ci95",
        ):
            assert k in r
        assert len(r["ci95"]["auc"]) == 2
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


def test_write_outputs_without_samples(tmp_path, audit):
    y, scores, results, keys, _, prov = audit
    paths = write_outputs(tmp_path, results, scores, y, keys, prov)
    assert "<img" in paths["report.html"].read_text()
    with pytest.raises(ValueError):
        write_outputs(tmp_path, results, scores, y, keys[:-1], prov)


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
