"""End-to-end `mmia audit` on a tiny world: every output file and its schema."""

import csv
import json

import pytest
from shardgen import write_good_shards

from mmia.audit import check_disjoint, parse_attacks
from mmia.cli import main
from mmia.embed import SampleRecord
from mmia.errors import MmiaError


@pytest.fixture(scope="module")
def audit_run(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("audit")
    roles = {}
    for i, role in enumerate(("members", "nonmembers", "known", "pool")):
        (root / role).mkdir()
        roles[role] = write_good_shards(root / role, 2, 12, seed=i + 1)
    out = root / "out"
    rc = main(["audit", "--model", "mmia-test-tiny", "--model-config", tiny_config,
               "--members", roles["members"], "--nonmembers", roles["nonmembers"],
               "--known-nonmembers", roles["known"], "--pool", roles["pool"],
               "--cache", str(root / "cache"), "--out", str(out), "--views", "2",
               "--bootstrap", "50", "--no-progress", "--workers", "0"])
    return rc, out


def test_audit_writes_all_four_outputs(audit_run):
    rc, out = audit_run
    assert rc == 0
    assert {p.name for p in out.iterdir()} >= {"metrics.json", "scores.csv", "roc.png",
                                               "report.html"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"attacks", "model", "data"} <= metrics.keys()
    for name, m in metrics["attacks"].items():
        assert name in {"csa", "aea", "wsa", "blind"}
        for k in ("auc", "tpr@1%fpr", "tpr@0.1%fpr", "balanced_accuracy", "advantage"):
            assert 0.0 <= m[k] <= 1.0 or k == "advantage"
            assert k in m["ci95"]
        assert m["n_members"] == 24 and m["n_nonmembers"] == 24
    assert {"csa", "aea", "blind"} <= metrics["attacks"].keys()
    assert metrics["model"]["fingerprint"]
    assert metrics["data"]["members"]["samples"] == 24
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert set(rows[0]) == {"key", "label", "attack", "score"}
    csa = [r for r in rows if r["attack"] == "csa"]
    assert len(csa) == 48 and sum(r["label"] == "1" for r in csa) == 24
    assert all(r["key"].startswith("members/") for r in csa if r["label"] == "1")
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"
    html = (out / "report.html").read_text()
    assert "src=\"http" not in html and "<table" in html


def test_wsa_without_known_nonmembers_is_skipped_with_a_message(tmp_path, tiny_config, capsys):
    for role in ("m", "n"):
        (tmp_path / role).mkdir()
    m = write_good_shards(tmp_path / "m", 1, 8, seed=1)
    n = write_good_shards(tmp_path / "n", 1, 8, seed=2)
    rc = main(["audit", "--model", "mmia-test-tiny", "--model-config", tiny_config,
               "--members", m, "--nonmembers", n, "--attacks", "csa,wsa",
               "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"),
               "--bootstrap", "20", "--no-progress", "--workers", "0"])
    assert rc == 0
    printed = capsys.readouterr()
    err = printed.err
    assert "attack wsa skipped" in err and "--known-nonmembers" in err
    assert "tpr@1%fpr: with 8 evaluation non-members" in printed.out  # the terminal says it too
    assert "blind baseline was not run" in printed.out
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert list(metrics["attacks"]) == ["csa"]


def test_same_content_in_members_and_nonmembers_is_an_error():
    a = SampleRecord("m/1", "i" * 32, "c" * 32, "x", "")
    b = SampleRecord("n/1", "i" * 32, "c" * 32, "x", "")
    with pytest.raises(MmiaError, match="same image and caption"):
        check_disjoint([a], [b])
    with pytest.raises(MmiaError, match="both members and non-members"):
        check_disjoint([a], [SampleRecord("m/1", "j" * 32, "c" * 32, "y", "")])


def test_unknown_attack_name_is_an_error():
    with pytest.raises(MmiaError, match="unknown attack"):
        parse_attacks("csa,nope")
