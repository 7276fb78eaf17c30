"""`mmia infer`: p-values, q-values, the members' lower bound, the shift check, the verdict
rules, the command end to end and its bad inputs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy import stats
from shardgen import good_members, write_good_shards, write_shard

import mmia.cli
from mmia.attacks import Features
from mmia.infer import (
    AttackTest,
    InferResult,
    ShiftCheck,
    assess_attack,
    bh_q_values,
    decide,
    format_p,
    infer_core,
    ks_critical_value,
    members_lower_bound,
    render_report,
    shift_check,
)
from mmia.metrics import conformal_p_values

# ------------------------------------------------------------------ p-values and q-values


def test_p_values_q_values_and_flags_match_hand_computed_values():
    """known 1..4: p = (1 + #known >= s) / 5; BH by hand; flags are p <= target FPR."""
    t = assess_attack("csa", np.array([4.5, 3.0, 0.5, 2.5]), np.array([1.0, 2.0, 3.0, 4.0]),
                      target_fpr=0.2, bound_alpha=0.05)
    np.testing.assert_allclose(t.p_values, [1 / 5, 3 / 5, 5 / 5, 3 / 5])
    # sorted p 0.2, 0.6, 0.6, 1.0 -> p * 4 / rank 0.8, 1.2, 0.8, 1.0 -> running min from the top
    np.testing.assert_allclose(t.q_values, [0.8, 0.8, 1.0, 0.8])
    assert t.flagged.tolist() == [True, False, False, False]
    # AUC = U / (n m): pairs where the candidate is higher, ties 1/2 (3.0 ties with 3.0)
    assert t.auc == pytest.approx((4 + 2.5 + 0 + 2) / 16)


def test_bh_q_values_textbook_example():
    np.testing.assert_allclose(bh_q_values(np.array([0.01, 0.04, 0.03, 0.005])),
                               [0.02, 0.04, 0.04, 0.02])


def test_mann_whitney_p_is_exact_for_tiny_sets():
    """Both candidates above both known: 1 of C(4, 2) = 6 orderings."""
    t = assess_attack("csa", np.array([3.0, 4.0]), np.array([1.0, 2.0]), 0.01, 0.05)
    assert t.mwu_p == pytest.approx(1 / 6)
    assert t.auc == 1.0


def test_flags_are_p_values_at_most_the_target_fpr():
    rng = np.random.default_rng(0)
    known, cand = rng.normal(size=299), np.round(rng.normal(0.5, 1, size=500), 1)
    for fpr in (0.01, 0.05, 0.2):
        t = assess_attack("csa", cand, known, fpr, 0.05)
        assert (t.flagged == (t.p_values <= fpr)).all()


# ------------------------------------------------------------------ the members' lower bound


def test_lower_bound_extremes_by_hand():
    """All candidates above every known score: k = n - 2 is refuted (the 2 non-members would
    all sit at the top, gap 1 > d(2, 300) = 0.87) and n - 1 is not (d(1, 300) = 1.23 > 1)."""
    m, n = 300, 50
    top = np.full(n, 1 / (m + 1))
    assert ks_critical_value(2, m, 0.05) < 1 < ks_critical_value(1, m, 0.05)
    assert members_lower_bound(top, m, 0.05) == n - 1
    assert members_lower_bound(np.ones(n), m, 0.05) == 0
    assert members_lower_bound(np.array([]), m, 0.05) == 0


def _ks_tail(n0: int, m: int, d: float) -> float:
    """Exact P(max over the merged order of i/n0 - j/m > d) for n0 draws and m known ones in
    uniformly random order: probability mass over lattice paths (i, j), stopped on crossing."""
    reach = np.zeros((n0 + 1, m + 1))
    reach[0, 0] = 1.0
    crossed = 0.0
    for i in range(n0 + 1):
        for j in range(m + 1):
            mass, left = reach[i, j], (n0 - i) + (m - j)
            if mass == 0.0 or left == 0:
                continue
            if i < n0:
                step = mass * (n0 - i) / left
                if (i + 1) / n0 - j / m > d + 1e-12:
                    crossed += step
                else:
                    reach[i + 1, j] += step
            if j < m:
                reach[i, j + 1] += mass * (m - j) / left
    return crossed


def test_ks_tail_by_hand():
    """1 draw among 1 known: it comes first with probability 1/2 (D+ = 1)."""
    assert _ks_tail(1, 1, 0.5) == pytest.approx(0.5)
    assert _ks_tail(2, 2, 0.99) == pytest.approx(1 / 6)  # both draws first: 1 of C(4, 2)


@pytest.mark.parametrize("alpha", [0.05, 0.05 / 3])
def test_ks_critical_value_holds_exactly_on_a_grid(alpha):
    """The critical value's exact tail (lattice-path counting) is at most alpha."""
    for m in (10, 30, 99, 300):
        for n0 in (1, 2, 3, 5, 8, 13, 25, 40):
            tail = _ks_tail(n0, m, ks_critical_value(n0, m, alpha))
            assert tail <= alpha, (n0, m, tail)


@pytest.mark.parametrize("n,m", [(100, 300), (20, 50)])
def test_lower_bound_covers_the_true_count(n, m):
    """Simulated conformal p-values (nulls N(0,1), members N(1.5,1)): the bound exceeds the
    true count in at most 5 % of draws (plus a binomial margin) and finds members when
    there are many."""
    rng = np.random.default_rng(1)
    sims = 400
    limit = stats.binom.ppf(0.99, sims, 0.05)
    for members in (0, n // 10, n // 2):
        bounds = []
        for _ in range(sims):
            known = rng.normal(size=m)
            cand = np.r_[rng.normal(1.5, 1, members), rng.normal(size=n - members)]
            bounds.append(members_lower_bound(conformal_p_values(known, cand), m, 0.05))
        bounds = np.array(bounds)
        assert (bounds > members).sum() <= limit, (members, np.bincount(bounds))
        if members == n // 2:
            assert (bounds > 0).mean() > 0.5


# ------------------------------------------------------------------ the shift check


def _design(captions: list[str], rng: np.random.Generator, shift: float) -> np.ndarray:
    stats_ = rng.normal(shift, 1, size=(len(captions), 10))
    return np.concatenate([np.array(captions, dtype=object)[:, None],
                           stats_.astype(object)], axis=1)


def _captions(rng: np.random.Generator, words: list[str], n: int) -> list[str]:
    return [" ".join(rng.choice(words, 6)) for _ in range(n)]


WORDS = ["red", "green", "blue", "circle", "square", "left", "right", "top", "small", "large"]
NEW_WORDS = ["teal", "pink", "star", "ring", "diamond", "lime", "brown", "maroon", "cyan", "x"]


@pytest.mark.parametrize("groups", [False, True])
def test_shift_check_tells_shifted_sets_apart_and_not_unshifted_ones(groups):
    rng = np.random.default_rng(0)
    n, m = 60, 120
    y = np.r_[np.ones(n), np.zeros(m)]
    same = np.concatenate([_design(_captions(rng, WORDS, n), rng, 0.0),
                           _design(_captions(rng, WORDS, m), rng, 0.0)])
    shifted = np.concatenate([_design(_captions(rng, NEW_WORDS, n), rng, 0.5),
                              _design(_captions(rng, WORDS, m), rng, 0.0)])
    g = [f"img{i // 2}" for i in range(n + m)] if groups else None  # copies share a fold
    quiet, loud = shift_check(same, y, g, seed=0), shift_check(shifted, y, g, seed=0)
    assert not quiet.detected and abs(quiet.auc - 0.5) < 0.15, quiet
    assert loud.detected and loud.auc > 0.9 and loud.p_value < 1e-6, loud


@pytest.mark.parametrize("groups,why", [
    (["x"] * 4, "all candidates share one image"),
    (["x", "x", "y", "y"], "all candidates share one image"),
    (["x", "y", "z", "z"], "all known non-members share one image"),
    (["x", "y", "y", "z"], "some candidates share an image with known non-members"),
])
def test_shift_check_without_two_images_per_class_says_why(groups, why):
    """Too few distinct images to cross-fit: no traceback, a reason, an inconclusive verdict."""
    design = _design(["a b", "c d", "e f", "g h"], np.random.default_rng(0), 0.0)
    result = shift_check(design, np.array([1, 1, 0, 0]), groups)
    assert result.auc is None and not result.detected and result.why.startswith(why)
    _, v = infer_core(*_scores(50), result)
    assert v.verdict == "inconclusive" and v.reason.startswith(why)


def test_shift_check_needs_two_of_each():
    design = _design(["a b", "c d", "e f"], np.random.default_rng(0), 0.0)
    result = shift_check(design, np.array([1, 0, 0]), None)
    assert result.auc is None and not result.detected
    assert result.why == "the shift check needs at least 2 candidates and there is 1"


# ------------------------------------------------------------------ the verdict rules

NO_SHIFT = ShiftCheck(0.5, 0.5, False)


def _scores(members: int, n: int = 100, m: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    cand = np.r_[rng.normal(2.0, 1, members), rng.normal(size=n - members)]
    return {"csa": cand}, {"csa": rng.normal(size=m)}


def test_verdict_used_with_bound_and_sentence():
    tests, v = infer_core(*_scores(50), NO_SHIFT)
    assert v.verdict == "used" and v.p_value < 1e-6 and v.attack == "csa"
    assert 0 < v.members_lower_bound <= 50
    assert v.sentence == (f"used: at least {v.members_lower_bound} of 100 candidates were in "
                          f"the training set (p = {format_p(v.p_value)})")


def test_verdict_not_detected_on_non_members():
    tests, v = infer_core(*_scores(0, seed=3), NO_SHIFT)
    assert v.verdict == "not_detected" and v.members_lower_bound == 0 and v.p_value >= 0.05
    assert "not detected" in v.sentence


def test_detected_shift_makes_any_result_inconclusive():
    shift = ShiftCheck(0.97, 1e-20, True)
    tests, v = infer_core(*_scores(100), shift)
    assert tests["csa"].mwu_p < 1e-20 and tests["csa"].lower_bound > 50
    assert v.verdict == "inconclusive" and v.members_lower_bound == 0
    assert "may be shift, not membership" in v.reason and "AUC 0.97" in v.reason
    assert v.shift_auc == 0.97 and v.sentence == f"inconclusive: {v.reason}"
    _, v = infer_core(*_scores(0, seed=3), shift)  # shifted and not higher: no null either
    assert v.verdict == "inconclusive" and "no valid null" in v.reason
    _, v = infer_core(*_scores(100), ShiftCheck(None, None, False, "too few"))
    assert v.verdict == "inconclusive" and v.shift_auc is None
    assert v.reason.startswith("too few; without it the candidates' higher scores (p = ")
    _, v = infer_core(*_scores(0, seed=3), ShiftCheck(None, None, False, "too few"))
    assert "higher scores" not in v.reason and "neither in nor out" in v.reason


def test_too_few_samples_to_reach_alpha_is_inconclusive():
    """2 candidates above 3 known non-members: the best rank test gives 1 / C(5, 2) = 0.1."""
    _, v = infer_core({"csa": np.array([5.0, 6.0])}, {"csa": np.array([1.0, 2.0, 3.0])},
                      NO_SHIFT)
    assert v.verdict == "inconclusive" and "no outcome could reach" in v.reason
    # 1 candidate above 50 known: p = 1 / 51 at best; times 3 attacks it cannot reach 0.05
    one = {a: np.array([9.0]) for a in ("csa", "aea", "wsa")}
    known = {a: np.arange(50.0) / 50 for a in one}
    assert infer_core(one, known, NO_SHIFT)[1].verdict == "inconclusive"
    assert infer_core({"csa": one["csa"]}, {"csa": known["csa"]}, NO_SHIFT)[1].verdict == "used"


def test_bonferroni_across_attacks_and_the_strongest_attack_named():
    def test(name: str, p: float) -> AttackTest:
        s = np.zeros(50)
        return AttackTest(name, s, np.zeros(200), s + 1, s + 1, 1.0, s > 0, p, 0.5, 3)

    v = decide({"csa": test("csa", 0.02), "aea": test("aea", 0.004)}, NO_SHIFT, 0.05)
    assert v.attack == "aea" and v.p_value == pytest.approx(0.008) and v.verdict == "used"
    v = decide({"csa": test("csa", 0.03), "aea": test("aea", 0.04)}, NO_SHIFT, 0.05)
    assert v.verdict == "not_detected" and v.p_value == pytest.approx(0.06)
    assert v.members_lower_bound == 0  # "not detected" never claims members


def test_format_p():
    assert [format_p(p) for p in (0.5, 0.0123, 2.04e-6, 1e-52, 0.0)] == [
        "0.5", "0.0123", "2e-6", "1e-52", "< 1e-300"]
    tests, v = infer_core(*_scores(100), NO_SHIFT)
    v = decide({"csa": AttackTest(**{**tests["csa"].__dict__, "mwu_p": 0.0})}, NO_SHIFT, 0.05)
    assert v.sentence.endswith("(p < 1e-300)"), v.sentence


def test_the_members_bound_is_at_95_percent_whatever_alpha():
    strict, loose = infer_core(*_scores(50), NO_SHIFT, alpha=0.001), infer_core(
        *_scores(50), NO_SHIFT, alpha=0.2)
    assert strict[0]["csa"].lower_bound == loose[0]["csa"].lower_bound > 0
    assert strict[1].members_lower_bound_level == 0.95
    assert "(95% confidence)" in strict[1].reason


def _result(tests, verdict, shift) -> InferResult:
    n = next(iter(tests.values())).scores.size
    feats = Features(keys=[f"k{i}" for i in range(n)], image=np.zeros((n, 2)),
                     text=np.zeros((n, 2)), captions=[f"c{i}" for i in range(n)])
    return InferResult(verdict, tests, shift, feats, ["u"] * n, ["s"] * n, [], {})


def test_attack_bounds_are_zero_unless_the_verdict_is_used():
    """A detected shift: the raw bound is large, yet verdict.json's attacks and the report's
    attack table say 0; with "used" they show it."""
    shift = ShiftCheck(0.97, 1e-20, True)
    tests, v = infer_core(*_scores(100), shift)
    assert tests["csa"].lower_bound > 50 and v.verdict == "inconclusive"
    result = _result(tests, v, shift)
    assert result.verdict_json()["attacks"]["csa"]["members_lower_bound"] == 0
    cells = render_report(result).split("<tr><th>csa</th>")[1].split("</tr>")[0]
    assert cells.count("<td>0</td>") == 1 and f"<td>{tests['csa'].lower_bound}</td>" not in cells
    tests, v = infer_core(*_scores(100), NO_SHIFT)
    result = _result(tests, v, NO_SHIFT)
    bound = result.verdict_json()["attacks"]["csa"]["members_lower_bound"]
    assert bound == tests["csa"].lower_bound == v.members_lower_bound > 50
    assert f"<td>{bound}</td>" in render_report(result).split("<tr><th>csa</th>")[1]


# ------------------------------------------------------------------ `mmia infer` end to end

VERDICT_TYPES = {"verdict": str, "p_value": float, "attack": str, "n_candidates": int,
                 "members_lower_bound": int, "shift_auc": float, "reason": str}


def _infer_argv(tiny_config, cand, known, out, cache, *extra):
    return ["infer", "--model", "mmia-test-tiny", "--model-config", tiny_config,
            "--device", "cpu", "--candidates", cand, "--known-nonmembers", known,
            "--cache", str(cache), "--out", str(out), "--workers", "0", "--batch-size", "4",
            "--no-progress", "--views", "1", *extra]


def test_mmia_infer_writes_every_output_with_its_schema(tmp_path, tiny_config, capsys):
    for d in ("c", "k", "p"):
        (tmp_path / d).mkdir()
    cand = write_good_shards(tmp_path / "c", 2, 4, seed=1)
    with_urls = [(name, _with_url(data) if name.endswith(".json") else data)
                 for name, data in good_members(0, 4, seed=1)]  # shard 0: img2dataset sidecars
    write_shard(tmp_path / "c/00000.tar", with_urls)
    known = write_good_shards(tmp_path / "k", 2, 6, seed=2)
    pool = write_good_shards(tmp_path / "p", 1, 6, seed=3)
    out = tmp_path / "out"
    rc = mmia.cli.main(_infer_argv(tiny_config, cand, known, out, tmp_path / "cache",
                                   "--pool", pool, "--wsa-lambda", "-10",
                                   "--wsa-classifier", "logreg"))
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    verdict = json.loads((out / "verdict.json").read_text())
    for key, kind in VERDICT_TYPES.items():
        assert isinstance(verdict[key], kind), (key, verdict[key])
    assert verdict["verdict"] in ("used", "not_detected", "inconclusive")
    assert verdict["n_candidates"] == 8 and verdict["n_known_nonmembers"] == 12
    assert set(verdict["attacks"]) == {"csa", "aea", "wsa"}
    assert verdict["attacks"]["wsa"]["n_calibration"] == 6  # held out of WSA's fitting
    assert verdict["sentence"] in printed.out.splitlines()[0]

    with (out / "candidates.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["key", "url", "caption", "attack", "score", "p_value", "q_value",
                             "flagged", "shard"]
    assert len(rows) == 8 * 3
    for r in rows:
        p, q = float(r["p_value"]), float(r["q_value"])
        assert 0 < p <= 1 and p <= q <= 1 and r["flagged"] in ("0", "1")
        assert r["caption"].startswith("a photo of item")
        shard, sample = r["key"].split("/")[-2:]  # keys: <folder>/<shard>/<sample key>
        assert r["shard"].endswith(f"c/{shard}.tar")
        # the sidecar's source URL where there is one, else the shard
        assert r["url"] == (f"https://example.org/{sample}.jpg" if shard == "00000"
                            else r["shard"])
    csa_p = [float(r["p_value"]) for r in rows if r["attack"] == "csa"]
    assert all(round(p * 13) == pytest.approx(p * 13) for p in csa_p)  # (1 + r) / (1 + 12)

    import pyarrow.parquet as pq

    table = pq.read_table(out / "candidates.parquet")
    assert table.column_names == list(rows[0])
    assert str(table.schema.field("flagged").type) == "bool"
    assert table.num_rows == len(rows)
    assert table.column("key").to_pylist() == [r["key"] for r in rows]

    page = (out / "report.html").read_text()
    body = page[page.index("<body>"):]
    first_p = body[body.index("<p"):]
    assert first_p[first_p.index(">") + 1:].startswith(verdict["sentence"] + "</p>")
    assert verdict["members_lower_bound_level"] == 0.95
    assert "data:image/jpeg;base64," in page  # thumbnails of the flagged candidates
    assert page.count("data:image/png;base64,") == 2  # p-value and score figures
    assert not list(out.glob(".mmia-writing-*"))


def _with_url(sidecar: bytes) -> bytes:
    meta = json.loads(sidecar)
    return json.dumps({**meta, "url": f"https://example.org/{meta['key']}.jpg"}).encode()


def test_the_pool_is_not_read_without_wsa(tmp_path, tiny_config):
    """--attacks csa with a pool that repeats the candidates: WSA would refuse that pool, but
    without WSA the pool is neither embedded nor checked."""
    for d in ("c", "k"):
        (tmp_path / d).mkdir()
    cand = write_good_shards(tmp_path / "c", 1, 4, seed=1)
    argv = _infer_argv(tiny_config, cand, write_good_shards(tmp_path / "k", 1, 8, seed=2),
                       tmp_path / "out", tmp_path / "cache", "--pool", cand, "--attacks", "csa")
    assert mmia.cli.main(argv) == 0
    verdict = json.loads((tmp_path / "out/verdict.json").read_text())
    assert set(verdict["data"]) == {"candidates", "known_nonmembers"}


def test_an_attack_that_cannot_run_is_a_note_and_the_others_decide(tmp_path, tiny_config,
                                                                   capsys):
    """WSA with no pool sample above its threshold is skipped with a note; Bonferroni then
    counts only the attacks that ran."""
    for d in ("c", "k", "p"):
        (tmp_path / d).mkdir()
    argv = _infer_argv(tiny_config, write_good_shards(tmp_path / "c", 1, 4, seed=1),
                       write_good_shards(tmp_path / "k", 1, 8, seed=2), tmp_path / "out",
                       tmp_path / "cache", "--pool", write_good_shards(tmp_path / "p", 1, 4, 3),
                       "--attacks", "csa,wsa", "--wsa-lambda", "100")
    assert mmia.cli.main(argv) == 0
    err = capsys.readouterr().err
    verdict = json.loads((tmp_path / "out/verdict.json").read_text())
    assert list(verdict["attacks"]) == ["csa"] and verdict["attack"] == "csa"
    assert verdict["p_value"] == pytest.approx(verdict["attacks"]["csa"]["mann_whitney_p"])
    assert any(n.startswith("attack wsa skipped: WSA: no pool sample") for n in verdict["notes"])
    assert "attack wsa skipped" in err


def _error_line(capsys) -> str:
    printed = capsys.readouterr()
    errors = [line for line in printed.err.splitlines() if line.startswith("mmia: error:")]
    assert len(errors) == 1, printed.err
    assert "Traceback" not in printed.err + printed.out
    return errors[0]


@pytest.mark.parametrize("case", ["no_candidates_flag", "no_known_flag", "empty_candidates",
                                  "empty_known", "overlap_by_content", "blind_attack",
                                  "unknown_attack"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_config, capsys, case):
    for d in ("c", "k", "copy"):
        (tmp_path / d).mkdir()
    cand = write_good_shards(tmp_path / "c", 1, 3, seed=1)
    known = write_good_shards(tmp_path / "k", 1, 4, seed=2)
    empty = write_shard(tmp_path / "empty.tar", [])
    argv = _infer_argv(tiny_config, cand, known, tmp_path / "out", tmp_path / "cache")
    words = {"no_candidates_flag": ["--candidates is required", "membership is unknown"],
             "no_known_flag": ["--known-nonmembers is required"],
             "empty_candidates": ["no usable candidates"],
             "empty_known": ["no usable known non-members"],
             "overlap_by_content": ["1 sample(s) of the candidates are also known non-members",
                                    "same image and caption"],
             "blind_attack": ["shift check", "csa,aea,wsa"],
             "unknown_attack": ["'csa,foo'", "runs attacks from csa,aea,wsa "]}[case]
    if case == "no_candidates_flag":
        argv = argv[:7] + argv[9:]
    elif case == "no_known_flag":
        argv = argv[:9] + argv[11:]
    elif case == "empty_candidates":
        argv[8] = empty
    elif case == "empty_known":
        argv[10] = empty
    elif case == "overlap_by_content":  # one known non-member is a candidate under a new key
        copy = good_members(0, 1, seed=1)
        copy = [(name.replace("000000000", "099999999"), data) for name, data in copy]
        argv[10] = write_shard(tmp_path / "copy/00000.tar", good_members(0, 4, seed=2) + copy)
    elif case == "blind_attack":
        argv += ["--attacks", "csa,blind"]
    elif case == "unknown_attack":
        argv += ["--attacks", "csa,foo"]
    assert mmia.cli.main(argv) == 2
    line = _error_line(capsys)
    for word in words:
        assert word in line, line
    if case == "no_candidates_flag":
        assert "known non-members" not in line and "null" not in line, line
