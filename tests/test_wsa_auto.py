"""WSA that learns: `--wsa-lambda auto` (Ko et al.'s λ grid) and [image ‖ text ‖ cosine] features.

Known non-members' cosines alternate -0.1 and 0.1 (μ = 0, σ = 0.1), so the grid's thresholds
μ + λσ are 0.25, 0.15, 0.05, 0, -0.05, -0.15, -0.25 and the pool samples each λ selects can be
counted by hand.
"""

import json

import numpy as np
import pytest
from shardgen import write_good_shards
from sklearn.metrics import roc_auc_score

from mmia.attacks import CSA, WSA, Features
from mmia.attacks.wsa import AUTO_LAMBDAS, LAMBDA_GRID, NoPseudoMembers, design
from mmia.audit import AuditConfig, run_attack
from mmia.checks import check_wsa_lambda
from mmia.cli import build_parser, main
from mmia.errors import MmiaError
from mmia.pilot import PilotSettings

D = 32


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _pairs(cos, seed: int = 0, prefix: str = "p") -> Features:
    """Image/text unit vectors in random directions with exactly the given cosines."""
    rng = np.random.default_rng(seed)
    cos = np.asarray(cos, float)[:, None]
    u = _unit(rng.normal(size=(len(cos), D)))
    v = rng.normal(size=(len(cos), D))
    v = _unit(v - np.sum(v * u, axis=1, keepdims=True) * u)
    text = _unit(cos * u + np.sqrt(1 - cos**2) * v)
    return Features(keys=[f"{prefix}{i}" for i in range(len(u))], image=u, text=text)


KNOWN = _pairs(np.tile([-0.1, 0.1], 50), seed=1, prefix="k")  # μ = 0, σ = 0.1
# selected per λ: 1.5 → 5, 0.5 → 25, 0 → 25, -0.5 → 35, -1.5 → 35, -2.5 → 35
POOL = _pairs(np.r_[np.full(5, 0.5), np.full(20, 0.1), np.full(10, -0.02), np.full(65, -0.6)])


def test_the_grid_is_ko_et_als_and_auto_never_asks_more_than_the_paper():
    assert LAMBDA_GRID == (2.5, 1.5, 0.5, 0.0, -0.5, -1.5, -2.5)  # released lambda_selection
    assert AUTO_LAMBDAS == (1.5, 0.5, 0.0, -0.5, -1.5, -2.5)


@pytest.mark.parametrize(("k", "lam", "n"), [(5, 1.5, 5), (6, 0.5, 25), (20, 0.5, 25),
                                             (26, -0.5, 35), (35, -0.5, 35)])
def test_auto_picks_the_largest_grid_lambda_selecting_enough(k, lam, n):
    wsa = WSA(lam="auto", min_pseudo_members=k, classifier="logreg").fit(KNOWN, POOL)
    assert wsa.lam_ == lam and wsa.n_pseudo_members_ == n
    assert wsa.threshold_ == pytest.approx(lam * 0.1, abs=1e-6)


def test_auto_keeps_the_papers_lambda_where_it_selects_enough():
    """2.5 would select as many, but auto starts at the paper's 1.5."""
    pool = _pairs(np.r_[np.full(25, 0.5), np.full(75, 0.0)])
    wsa = WSA(lam="auto", classifier="logreg").fit(KNOWN, pool)  # default: ≥ 20
    assert wsa.lam_ == 1.5 and wsa.n_pseudo_members_ == 25
    np.testing.assert_array_equal(wsa.pseudo_member_idx_, np.arange(25))


def test_auto_uses_the_smallest_lambda_when_none_selects_enough():
    wsa = WSA(lam="auto", min_pseudo_members=50, classifier="logreg").fit(KNOWN, POOL)
    assert wsa.lam_ == -2.5 and wsa.n_pseudo_members_ == 35  # the most any λ selects


def test_auto_with_nobody_above_any_grid_value_names_the_smallest_lambda_tried():
    with pytest.raises(NoPseudoMembers, match=r"auto grid .*smallest tried, lam=-2\.5"):
        WSA(lam="auto").fit(KNOWN, _pairs(np.full(30, -0.5)))


def test_a_number_is_used_as_given_even_when_it_selects_few():
    wsa = WSA(lam=1.5, classifier="logreg").fit(KNOWN, POOL)
    assert (wsa.lam_, wsa.n_pseudo_members_, wsa.auto) == (1.5, 5, False)
    with pytest.raises(NoPseudoMembers, match=r"threshold 0\.1500 .*lam=1\.5\); lower lam"):
        WSA(lam=1.5).fit(KNOWN, _pairs(np.full(30, 0.1)))


def test_auto_in_the_audit_api_skips_wsa_with_the_smallest_lambda_in_its_message():
    feats = {"known_nonmembers": KNOWN, "pool": _pairs(np.full(30, -0.5)),
             "evaluation": _pairs(np.full(10, 0.0), prefix="e")}
    cfg = AuditConfig(members=[], nonmembers=[])
    assert cfg.wsa_lambda == "auto"
    with pytest.raises(MmiaError, match="lam=-2.5"):
        run_attack("wsa", cfg, feats, np.r_[np.ones(5), np.zeros(5)].astype(int))


# --- [image ‖ text ‖ cosine]


def test_concat_cos_appends_csas_score_as_the_last_column():
    ev = _pairs(np.linspace(-0.9, 0.9, 40), seed=3, prefix="e")
    x = design(ev.image, ev.text, "concat_cos")
    assert x.shape == (40, 2 * D + 1)
    np.testing.assert_array_equal(x[:, -1], CSA().score(ev))
    np.testing.assert_array_equal(x[:, :-1], design(ev.image, ev.text, "concat"))
    wsa = WSA(lam="auto", classifier="logreg", features="concat_cos").fit(KNOWN, POOL)
    assert wsa.model_.n_features_in_ == 2 * D + 1
    np.testing.assert_allclose(wsa.score(ev), wsa.model_.predict_proba(x)[:, 1], rtol=1e-12)
    mlp = WSA(lam="auto", features="concat_cos").fit(KNOWN, POOL)
    assert mlp.model_.n_features_in_ == 2 * D + 1
    np.testing.assert_allclose(mlp.score(ev), mlp.model_.predict_proba(x)[:, 1], atol=1e-5)


def test_concat_cos_learns_membership_that_lives_only_in_the_cosine():
    """Random directions, members at cosine 0.6: no linear function of [image ‖ text] sees
    the agreement of the two; with the cosine column a linear classifier does."""
    rng = np.random.default_rng(7)
    known = _pairs(rng.uniform(-0.1, 0.1, 200), seed=4, prefix="k")
    pool = _pairs(np.r_[np.full(60, 0.6), rng.uniform(-0.1, 0.1, 60)], seed=5)
    ev = _pairs(np.r_[np.full(100, 0.6), rng.uniform(-0.1, 0.1, 100)], seed=6, prefix="e")
    y = np.r_[np.ones(100), np.zeros(100)]
    aucs = {f: roc_auc_score(y, WSA(lam="auto", classifier="logreg", features=f)
                             .fit(known, pool).score(ev)) for f in ("concat", "concat_cos")}
    assert aucs["concat_cos"] > 0.99 and aucs["concat"] < 0.75, aucs


# --- settings and the command line


@pytest.mark.parametrize("value", ["auto", 1.5, 0, -2.5])
def test_auto_and_finite_numbers_are_accepted(value):
    check_wsa_lambda(value)


@pytest.mark.parametrize("value", ["abc", "AUTO", float("nan"), float("inf"), True, None])
def test_other_lambdas_are_refused_in_one_line(value):
    with pytest.raises(MmiaError, match="--wsa-lambda must be 'auto' or a finite number"):
        check_wsa_lambda(value)


@pytest.mark.parametrize("command", ["audit", "pilot", "infer"])
def test_the_default_lambda_is_auto_and_a_number_stays_a_number(command):
    required = {"audit": ["--model", "m", "--members", "a", "--nonmembers", "b", "--out", "o"],
                "infer": ["--model", "m", "--out", "o"], "pilot": []}[command]
    parse = build_parser().parse_args
    assert parse([command, *required]).wsa_lambda == "auto"
    assert parse([command, *required, "--wsa-lambda", "Auto"]).wsa_lambda == "auto"
    assert parse([command, *required, "--wsa-lambda", "1.5"]).wsa_lambda == 1.5
    assert parse([command, *required]).wsa_features == "concat"
    assert parse([command, *required, "--wsa-features", "concat_cos"]).wsa_features \
        == "concat_cos"
    assert PilotSettings().wsa_lambda == "auto"


@pytest.mark.parametrize("command", ["audit", "pilot", "infer"])
@pytest.mark.parametrize("value", ["abc", "nan", "inf"])
def test_a_bad_lambda_on_the_command_line_is_one_error_line(tmp_path, capsys, command, value):
    argv = {"audit": ["--model", "m", "--members", "a", "--nonmembers", "b"],
            "infer": ["--model", "m", "--candidates", "a", "--known-nonmembers", "b"],
            "pilot": ["--root", str(tmp_path / "root")]}[command]
    rc = main([command, *argv, "--out", str(tmp_path / "o"), "--wsa-lambda", value])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines() == [
        f"mmia: error: --wsa-lambda must be 'auto' or a finite number, got {float(value)!r}"
        if value != "abc" else "mmia: error: --wsa-lambda must be 'auto' or a finite number, "
        "got 'abc'"]
    assert not (tmp_path / "root").exists()


# --- end to end: the λ auto used, recorded in metrics.json


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple:
    root = tmp_path_factory.mktemp("wsa_auto")
    paths = []
    for i, (role, n) in enumerate((("m", 12), ("n", 12), ("k", 30), ("p", 30))):
        (root / role).mkdir()
        paths.append(write_good_shards(root / role, 1, n, seed=10 + i))
    return root, paths


def _audit_wsa(root, paths, tiny_config, out: str, *flags: str) -> dict:
    m, n, k, p = paths
    rc = main(["audit", "--model", "mmia-test-tiny", "--model-config", tiny_config,
               "--members", m, "--nonmembers", n, "--known-nonmembers", k, "--pool", p,
               "--attacks", "csa,wsa", "--views", "0", "--bootstrap", "0", "--workers", "0",
               "--cache", str(root / "cache"), "--out", str(root / out), "--no-progress",
               *flags])
    assert rc == 0
    return json.loads((root / out / "metrics.json").read_text())


def test_audit_records_the_lambda_auto_picked_and_it_is_the_largest_selecting_20(
        shards, tiny_config):
    root, paths = shards
    metrics = _audit_wsa(root, paths, tiny_config, "auto")
    assert metrics["settings"]["wsa_lambda"] == "auto"
    wsa = metrics["attacks"]["wsa"]
    lam, n = wsa["wsa_lambda"], wsa["n_pseudo_members"]
    assert wsa["wsa_lambda_auto"] is True and wsa["wsa_min_pseudo_members"] == 20
    assert lam in AUTO_LAMBDAS and (n >= 20 or lam == -2.5)
    assert wsa["wsa_threshold"] == pytest.approx(
        wsa["wsa_known_csa_mean"] + lam * wsa["wsa_known_csa_std"])
    fixed = _audit_wsa(root, paths, tiny_config, "fixed", "--wsa-lambda", str(lam))
    assert fixed["settings"]["wsa_lambda"] == lam
    assert fixed["attacks"]["wsa"]["wsa_lambda_auto"] is False
    assert fixed["attacks"]["wsa"]["n_pseudo_members"] == n
    assert fixed["attacks"]["wsa"]["auc"] == wsa["auc"]  # the same pseudo-labels, the same fit
    larger = [g for g in AUTO_LAMBDAS if g > lam]
    if larger:  # the next larger λ of the grid selects fewer than 20
        stricter = _audit_wsa(root, paths, tiny_config, "stricter", "--wsa-lambda",
                              str(larger[-1]))
        assert stricter["attacks"].get("wsa", {}).get("n_pseudo_members", 0) < 20
