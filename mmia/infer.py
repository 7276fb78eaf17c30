"""`mmia infer`: was this data used to train the model?

Unlabeled candidates are scored by the attacks and compared with known non-members (data the
model cannot have seen), which are the null distribution:

- per candidate and attack: a conformal p-value p = (1 + #{known >= s}) / (1 + n_known), a flag
  at the target FPR (p <= target FPR) and a Benjamini–Hochberg q-value across candidates;
- for the whole set: a one-sided Mann–Whitney U test per attack (candidates score higher than
  known non-members), Bonferroni across attacks; a lower confidence bound on how many candidates
  are members (two-sample Kolmogorov–Smirnov inversion, see `members_lower_bound`); and a shift
  check, the blind baseline cross-fitted to tell candidates from known non-members. When it
  can, a low p-value may be distribution shift: the verdict is then "inconclusive".

Attacks that learn from known non-members (WSA) fit on one part of them and take p-values from
the other. The statistical core (`assess_attack`, `members_lower_bound`, `shift_check`,
`decide`) works on score arrays and a blind design matrix, without a model. `run_inference`
returns an `InferResult` and neither prints nor parses; `InferResult.write` writes the outputs.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy import stats
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from mmia.attacks import Features
from mmia.attacks.blind import Blind, blind_design
from mmia.audit import (
    AttackSettings,
    AuditConfig,
    check_roles_disjoint,
    data_provenance,
    embed_role,
    features_of,
    first_line,
    role_views,
    run_attack,
    settings_provenance,
    skipped_attacks,
)
from mmia.cache import EmbeddingCache
from mmia.checks import check_fraction
from mmia.embed import EmbedResult
from mmia.errors import MmiaError
from mmia.metrics import conformal_p_values, threshold_at_fpr
from mmia.report import data_uri, jsonable, png, template, thumbnail, write_together
from mmia.sample_index import ImageLoader

log = logging.getLogger(__name__)
INFER_ATTACKS = ("csa", "aea", "wsa")
ROLES = ("candidates", "known_nonmembers", "pool")
OUTPUTS = ("candidates.csv", "candidates.parquet", "verdict.json", "report.html")
CSV_COLUMNS = ("key", "url", "caption", "attack", "score", "p_value", "q_value", "flagged",
               "shard")  # url: the sample's source URL (its .json sidecar), else its shard's
BOUND_LEVEL = 0.05  # the members' lower bound is a 95 % bound whatever --alpha is
TEMPLATE = "infer.html.j2"
SHIFT_LEVEL = 0.05  # the shift check's level: fixed, so a stricter --alpha never makes it
#                     less sensitive
SHIFT_FOLDS = 2
TOP_K = 10
# (role, other role, why the overlap is an error), for `check_roles_disjoint`
ROLE_PAIRS = (
    ("candidates", "known_nonmembers",
     "a candidate cannot be tested against itself: remove it from --known-nonmembers"),
    ("pool", "candidates",
     "WSA would train on the candidates it scores: remove them from --pool"),
    ("pool", "known_nonmembers",
     "WSA could train on the known non-members it is calibrated on: remove them from --pool"),
)


def attacks_error(got: object) -> str:
    return (f"unknown attack(s) in {got!r}: `mmia infer` runs attacks from "
            f"{','.join(INFER_ATTACKS)} (the blind baseline runs as the shift check)")


def parse_attacks(text: str) -> tuple[str, ...]:
    """`--attacks csa,wsa` as a tuple of names `mmia infer` runs; one-line MmiaError else."""
    names = tuple(a.strip().lower() for a in text.split(",") if a.strip())
    if not names or any(a not in INFER_ATTACKS for a in names):
        raise MmiaError(attacks_error(text))
    return names


@dataclass
class InferConfig(AttackSettings):
    """Everything an inference needs besides the model.

    candidates: shard patterns of the samples whose membership is unknown; known_nonmembers:
    samples the model cannot have seen (the null distribution); pool: unlabeled data for WSA.
    alpha: level of the dataset test (the members' lower bound is always a 95 % bound).
    calibration_fraction: share of the known non-members held out of WSA's fitting; its
    p-values come from them. progress: False, True or a callable(done, counts).
    """

    candidates: list[str]
    known_nonmembers: list[str]
    pool: list[str] = field(default_factory=list)
    attacks: tuple[str, ...] = INFER_ATTACKS
    out: str = "mmia-out/infer"
    alpha: float = 0.05

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse settings no inference can run with: one-line MmiaError, before any work."""
        for flag, patterns, what in (
                ("--candidates", self.candidates, "the samples whose membership is unknown"),
                ("--known-nonmembers", self.known_nonmembers,
                 "data the model cannot have seen, the null every p-value is measured against")):
            if not patterns:
                raise MmiaError(f"{flag} is required: give shard patterns of {what}")
        names = () if isinstance(self.attacks, str) else tuple(self.attacks)
        if not names or any(a not in INFER_ATTACKS for a in names):
            raise MmiaError(attacks_error(self.attacks))
        check_fraction("--alpha", self.alpha)
        check_fraction("--target-fpr", self.target_fpr)
        self.attack_config()  # the settings shared with `mmia audit`, checked as there

    def attack_config(self) -> AuditConfig:
        """The attack settings as an AuditConfig (for `mmia.audit.run_attack`); candidates
        take the evaluation role."""
        return AuditConfig(
            members=list(self.candidates), nonmembers=list(self.known_nonmembers),
            known_nonmembers=list(self.known_nonmembers), pool=list(self.pool),
            attacks=tuple(self.attacks), out=self.out, n_bootstrap=0,
            **self.attack_settings())


# ------------------------------------------------------------------ the statistical core


@dataclass
class AttackTest:
    """One attack's answer: per-candidate p/q-values and flags, and its dataset-level test.

    `calibration`: the known non-members' scores the p-values come from (the attack did not
    train on them). `mwu_p`: one-sided Mann–Whitney U p-value (candidates higher);
    `auc`: P(candidate > known) (ties 1/2); `lower_bound`: members among the candidates at
    confidence 1 - the level it was computed at (see `assess_attack`).
    """

    name: str
    scores: np.ndarray
    calibration: np.ndarray
    p_values: np.ndarray
    q_values: np.ndarray
    threshold: float
    flagged: np.ndarray
    mwu_p: float
    auc: float
    lower_bound: int

    def summary(self, used: bool) -> dict:
        """The per-attack figures of verdict.json; the members' bound is 0 unless the verdict
        is "used" (see `decide`)."""
        return {"mann_whitney_p": self.mwu_p, "auc_vs_known": self.auc,
                "members_lower_bound": self.lower_bound if used else 0,
                "threshold": self.threshold,
                "n_flagged": int(self.flagged.sum()),
                "n_calibration": int(self.calibration.size)}


def bh_q_values(p_values: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values) of one family."""
    p = np.asarray(p_values, dtype=np.float64)
    return stats.false_discovery_control(p, method="bh") if p.size else p.copy()


def ks_critical_value(n0: int, m: int, alpha: float) -> float:
    """Critical value d of the one-sided two-sample Kolmogorov–Smirnov statistic for samples
    of n0 and m: P(D+ > d) <= alpha, from the limit law exp(-2 d² n0 m / (n0 + m)) (below
    alpha at the sizes checked by simulation in tests/test_infer.py and the validation)."""
    return math.sqrt(math.log(1.0 / alpha) / 2.0 * (1.0 / n0 + 1.0 / m))


def members_lower_bound(p_values: np.ndarray, n_known: int, alpha: float) -> int:
    """Lower (1 - alpha) confidence bound on how many candidates are members, from their
    conformal p-values against `n_known` known non-members.

    A candidate's p-value is (r + 1) / (n_known + 1) with r known scores at or above it. If k
    of the n candidates are members, the n - k others are exchangeable with the known
    non-members, so with probability 1 - alpha, at every j, the share of them with p <= j /
    (n_known + 1) exceeds (j - 1) / n_known by at most the two-sample KS critical value d(n - k,
    n_known). k is rejected when even with all k members among the low p-values some j breaks
    that; rejection is monotone in k, and the bound is the smallest k not rejected. Meinshausen
    & Rice (2006) bound the non-null proportion the same way for independent p-values; the
    two-sample form also covers the shared calibration set.
    """
    p = np.asarray(p_values, dtype=np.float64)
    n, m = p.size, int(n_known)
    if n == 0 or m == 0:
        return 0
    ranks = np.rint(p * (m + 1)).astype(np.int64)  # r + 1, in 1 .. m + 1
    j = np.arange(1, m + 1)
    below = np.searchsorted(np.sort(ranks), j, side="right")  # candidates with p <= j/(m+1)

    def rejected(k: int) -> bool:
        if k >= n:
            return False
        gap = np.max((below - k) / (n - k) - (j - 1) / m)
        return gap > ks_critical_value(n - k, m, alpha)

    lo, hi = 0, n  # smallest k not rejected lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if rejected(mid):
            lo = mid + 1
        else:
            hi = mid
    return lo


def assess_attack(name: str, scores: np.ndarray, calibration: np.ndarray, target_fpr: float,
                  bound_alpha: float) -> AttackTest:
    """P-values, q-values, flags, the Mann–Whitney test and the members' lower bound (at
    confidence 1 - bound_alpha) of one attack's candidate scores against `calibration`."""
    s = np.asarray(scores, dtype=np.float64)
    cal = np.asarray(calibration, dtype=np.float64)
    if s.size == 0 or cal.size == 0:
        raise ValueError("assess_attack needs candidate and calibration scores")
    if not (np.isfinite(s).all() and np.isfinite(cal).all()):
        raise MmiaError(f"attack {name}: scores contain NaN or inf")
    p = conformal_p_values(cal, s)
    threshold = threshold_at_fpr(cal, target_fpr)
    test = stats.mannwhitneyu(s, cal, alternative="greater")
    return AttackTest(
        name=name, scores=s, calibration=cal, p_values=p, q_values=bh_q_values(p),
        threshold=threshold, flagged=s >= threshold, mwu_p=float(test.pvalue),
        auc=float(test.statistic) / (s.size * cal.size),
        lower_bound=members_lower_bound(p, cal.size, bound_alpha))


@dataclass
class ShiftCheck:
    """Can a classifier that never queries the model tell candidates (1) from known
    non-members (0)? `auc`: its mean held-out AUC; `p_value`: one-sided, of AUC > 0.5;
    `detected`: p_value < SHIFT_LEVEL. `auc` is None when it could not run (`why` says why)."""

    auc: float | None
    p_value: float | None
    detected: bool
    why: str = ""


def shift_check(design: np.ndarray, is_candidate: np.ndarray, groups: list[str] | None,
                seed: int = 0) -> ShiftCheck:
    """The blind baseline (`mmia.attacks.blind`: caption n-grams and image statistics)
    cross-fitted on two halves, each scoring the half it did not learn from; copies of one
    image stay in one half.

    Each half's one-sided Mann–Whitney test of its held-out scores is exact under
    exchangeability; the p-value is the smaller, doubled (Bonferroni). Pooling out-of-fold
    scores of several models instead gives a test that fires too often (measured: 8-13 % at
    a nominal 5 % on exchangeable pilot sets), because each model scores on its own scale.
    """
    y = np.asarray(is_candidate).astype(np.int64)
    why = cannot_split(y, groups)
    if why:
        return ShiftCheck(None, None, False, why)
    if groups is None:
        folds = StratifiedKFold(n_splits=SHIFT_FOLDS, shuffle=True, random_state=seed)
    else:
        folds = StratifiedGroupKFold(n_splits=SHIFT_FOLDS, shuffle=True, random_state=seed)
    p_values, aucs = [], []
    for train, test in folds.split(design, y, groups):
        if len(np.unique(y[train])) < 2 or len(np.unique(y[test])) < 2:
            return ShiftCheck(None, None, False, "the shift check could not split the images "
                              "into two halves that each hold candidates and known non-members")
        model = Blind().make_pipeline(design.shape[1]).fit(design[train], y[train])
        held_out = model.predict_proba(design[test])[:, 1]
        test_y = y[test]
        p_values.append(stats.mannwhitneyu(held_out[test_y == 1], held_out[test_y == 0],
                                           alternative="greater").pvalue)
        aucs.append(roc_auc_score(test_y, held_out))
    p = min(1.0, len(p_values) * float(min(p_values)))
    return ShiftCheck(float(np.mean(aucs)), p, p < SHIFT_LEVEL)


def cannot_split(y: np.ndarray, groups: list[str] | None) -> str:
    """Why candidates (y = 1) and known non-members (y = 0) cannot be cross-fitted in two
    halves with each image's copies kept together; "" when they can."""
    names = {1: ("candidate", "candidates"), 0: ("known non-member", "known non-members")}
    ids = np.asarray(groups, dtype=object) if groups is not None else None
    for label in (1, 0):
        one, many = names[label]
        count = int((y == label).sum())
        if count < SHIFT_FOLDS:
            return (f"the shift check needs at least {SHIFT_FOLDS} {many} and there "
                    f"{'is' if count == 1 else 'are'} {count}")
        if ids is not None and len(set(ids[y == label])) < SHIFT_FOLDS:
            return (f"all {many} share one image, so the shift check cannot hold out "
                    f"a {one} whose image it did not learn from")
    if ids is not None and set(ids[y == 1]) & set(ids[y == 0]):
        return ("some candidates share an image with known non-members, so the shift check "
                "cannot keep each image in one half")
    return ""


@dataclass
class Verdict:
    """The dataset-level answer; `as_dict` is verdict.json's core."""

    verdict: str  # "used" | "not_detected" | "inconclusive"
    p_value: float
    attack: str
    n_candidates: int
    members_lower_bound: int
    shift_auc: float | None
    reason: str
    sentence: str
    alpha: float
    shift_p_value: float | None
    n_known_nonmembers: int
    members_lower_bound_level: float = 1 - BOUND_LEVEL  # its confidence, whatever alpha is

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def format_p(p: float) -> str:
    """A p-value for a table: 0.012, 3e-4, 2e-6, and "< 1e-300" below 1e-300 (a p-value
    that underflowed to 0 is not 0)."""
    if p < 1e-300:
        return "< 1e-300"
    if p >= 0.001:
        return f"{p:.3g}"
    mantissa, exponent = f"{p:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def p_text(p: float) -> str:
    """"p = 2e-6" or "p < 1e-300", for a sentence."""
    text = format_p(p)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def smallest_p(n: int, m: int) -> float:
    """The smallest p-value the one-sided Mann–Whitney test can give n candidates against m
    known non-members (every candidate above every known one, no ties), computed the way
    `assess_attack` computes it (exact for small sets, else the normal approximation)."""
    best = stats.mannwhitneyu(np.arange(n, dtype=float) + m, np.arange(m, dtype=float),
                              alternative="greater")
    return float(best.pvalue)


def decide(tests: Mapping[str, AttackTest], shift: ShiftCheck, alpha: float,
           n_known: int | None = None) -> Verdict:
    """The verdict from each attack's test (Bonferroni across attacks) and the shift check.
    `n_known`: how many known non-members there were (default: the most any attack used).

    - inconclusive when the shift check tells candidates from known non-members apart (or could
      not run), or when no outcome could reach alpha with so few samples;
    - used when the smallest Bonferroni-adjusted Mann–Whitney p-value is below alpha;
    - not_detected otherwise.
    The members' lower bound is the largest of the attacks' bounds (each at BOUND_LEVEL /
    attacks, so all hold together with probability 95 %) when the verdict is "used", else 0 (which
    only lowers it): it assumes the candidates' non-members are exchangeable with the known
    ones, which a detected shift denies, and a bound above 0 beside "not detected" would
    contradict the sentence.
    """
    if not tests:
        raise ValueError("decide needs at least one attack's test")
    adjusted = {name: min(1.0, t.mwu_p * len(tests)) for name, t in tests.items()}
    best = min(adjusted, key=lambda name: (adjusted[name], name))
    p, n = adjusted[best], tests[best].scores.size
    n_cal = min(t.calibration.size for t in tests.values())
    bound = max(t.lower_bound for t in tests.values())
    if shift.auc is None or shift.detected:
        verdict, reason = "inconclusive", shift_reason(shift, p, alpha)
    elif smallest_p(n, n_cal) * len(tests) >= alpha:
        verdict = "inconclusive"
        reason = (f"with {n} candidates and {n_cal} known non-members no outcome could reach "
                  f"p < {alpha:g}: give more of either")
    elif p < alpha:
        verdict = "used"
        reason = (f"the candidates score higher than the known non-members under {best} "
                  f"({p_text(p)} < {alpha:g}) and "
                  + (f"at least {bound} of them must be members ({1 - BOUND_LEVEL:.0%} "
                     "confidence)"
                     if bound else "too few stand out to bound how many were members"))
    else:
        verdict = "not_detected"
        reason = (f"the candidates do not score higher than the known non-members at level "
                  f"{alpha:g} ({p_text(p)}, {best}); this does not show they were unused")
    bound = bound if verdict == "used" else 0
    m = n_known if n_known is not None else max(t.calibration.size for t in tests.values())
    return Verdict(verdict=verdict, p_value=p, attack=best, n_candidates=n,
                   members_lower_bound=int(bound), shift_auc=shift.auc, reason=reason,
                   sentence=verdict_sentence(verdict, reason, n, bound, p), alpha=alpha,
                   shift_p_value=shift.p_value, n_known_nonmembers=m)


def shift_reason(shift: ShiftCheck, p: float, alpha: float) -> str:
    """Why a failed or missing shift check makes the verdict inconclusive; the wording
    depends on whether the test's p-value was low."""
    if shift.auc is None:
        if p < alpha:
            return (f"{shift.why}; without it the candidates' higher scores ({p_text(p)}) "
                    "could be distribution shift rather than membership")
        return (f"{shift.why}; without it the known non-members cannot be shown to be a "
                f"valid null, and the test ({p_text(p)}) can rule membership neither in nor out")
    told = (f"a classifier that never queries the model tells the candidates from the known "
            f"non-members apart (AUC {shift.auc:.2f}, {p_text(shift.p_value)}), so ")
    if p < alpha:
        return told + f"their higher scores ({p_text(p)}) may be shift, not membership"
    return told + (f"the known non-members are no valid null for them and the test "
                   f"({p_text(p)}) can rule membership neither in nor out")


def verdict_sentence(verdict: str, reason: str, n: int, bound: int, p: float) -> str:
    """The one plain sentence the report opens with and the terminal prints."""
    them = f"the {n} candidates" if n != 1 else "the candidate"
    if verdict == "used" and bound:
        return (f"used: at least {bound} of {n} candidates were in the training set "
                f"({p_text(p)})")
    if verdict == "used":
        return (f"used: {them} score{'s' * (n == 1)} higher than the known non-members "
                f"({p_text(p)}), though too few stand out to say how many were in the "
                "training set")
    if verdict == "not_detected":
        return (f"not detected: no sign that {them} {'were' if n != 1 else 'was'} in the "
                f"training set ({p_text(p)})")
    return f"inconclusive: {reason}"


def infer_core(candidate_scores: Mapping[str, np.ndarray],
               calibration_scores: Mapping[str, np.ndarray], shift: ShiftCheck,
               alpha: float = 0.05, target_fpr: float = 0.01, n_known: int | None = None,
               ) -> tuple[dict[str, AttackTest], Verdict]:
    """Every attack's test and the verdict, from scores alone (no model, no files). The
    members' bound is at 95 % confidence (BOUND_LEVEL split across the attacks), whatever
    alpha is."""
    bound_alpha = BOUND_LEVEL / len(candidate_scores)
    tests = {name: assess_attack(name, s, calibration_scores[name], target_fpr, bound_alpha)
             for name, s in candidate_scores.items()}
    return tests, decide(tests, shift, alpha, n_known)


# ------------------------------------------------------------------ running it on shards


@dataclass
class InferResult:
    """Everything an inference found; `write` turns it into the output files."""

    verdict: Verdict
    tests: dict[str, AttackTest]
    shift: ShiftCheck
    candidates: Features
    urls: list[str]  # each candidate's source URL (its .json sidecar's "url"), else its shard
    shards: list[str]  # the shard each candidate was read from
    notes: list[str]
    embed: dict[str, EmbedResult]
    provenance: dict = field(default_factory=dict)
    image_loader: Callable[[list[int]], list[bytes | None]] | None = None  # for thumbnails

    @property
    def sentence(self) -> str:
        return self.verdict.sentence

    def verdict_json(self) -> dict:
        """verdict.json: the verdict, each attack's figures, the shift check, notes, provenance."""
        doc = self.verdict.as_dict()
        doc.update(shift_detected=self.shift.detected, shift_level=SHIFT_LEVEL,
                   target_fpr=self.provenance.get("settings", {}).get("target_fpr"),
                   attacks={name: t.summary(self.verdict.verdict == "used")
                            for name, t in self.tests.items()},
                   notes=list(self.notes))
        doc.update({k: v for k, v in self.provenance.items() if k not in doc})
        return jsonable(doc)

    def rows(self) -> list[tuple]:
        """candidates.csv's rows: one per candidate and attack."""
        c = self.candidates
        return [(c.keys[i], self.urls[i], c.captions[i], name, float(t.scores[i]),
                 float(t.p_values[i]), float(t.q_values[i]), bool(t.flagged[i]), self.shards[i])
                for name, t in self.tests.items() for i in range(len(c))]

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write candidates.csv, candidates.parquet, verdict.json and report.html together."""
        return write_together(out_dir, OUTPUTS, self._write_all)

    def _write_all(self, folder: Path) -> None:
        rows = self.rows()
        with (folder / "candidates.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(CSV_COLUMNS)
            w.writerows((*r[:4], repr(r[4]), repr(r[5]), repr(r[6]), int(r[7]), r[8])
                        for r in rows)
        write_parquet(folder / "candidates.parquet", rows)
        (folder / "verdict.json").write_text(json.dumps(self.verdict_json(), indent=2,
                                                        allow_nan=False))
        (folder / "report.html").write_text(render_report(self), encoding="utf-8")


def write_parquet(path: Path, rows: list[tuple]) -> None:
    """candidates.csv's table as Parquet (typed columns, for joins with LAION metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in CSV_COLUMNS]
    types = (pa.string(), pa.string(), pa.string(), pa.string(), pa.float64(), pa.float64(),
             pa.float64(), pa.bool_(), pa.string())
    table = pa.table({name: pa.array(list(col), type=t)
                      for name, col, t in zip(CSV_COLUMNS, columns, types, strict=True)})
    pq.write_table(table, path)


def _concat_design(a: Features, b: Features) -> tuple[np.ndarray, list[str] | None]:
    """The blind design of candidates then known non-members, and their image groups."""
    design = np.concatenate([blind_design(a), blind_design(b)], axis=0)
    groups = None if a.groups is None or b.groups is None else list(a.groups) + list(b.groups)
    return design, groups


def run_inference(loaded, cfg: InferConfig, command: str = "") -> InferResult:
    """Embed the candidates, known non-members and pool, run the attacks, test; writes
    nothing (see `InferResult.write`)."""
    acfg = cfg.attack_config()
    views = cfg.views if "aea" in cfg.attacks else 0
    roles = [r for r in ROLES if getattr(cfg, r) and (r != "pool" or "wsa" in cfg.attacks)]
    if cfg.pool and "wsa" not in cfg.attacks:
        log.info("--pool is ignored: only WSA reads it and it is not among the attacks")
    embedded = {role: embed_role(loaded, cfg, role, getattr(cfg, role), role_views(role, views))
                for role in roles}
    for role, name, why in (
            ("candidates", "candidates", "nothing to test"),
            ("known_nonmembers", "known non-members",
             "they are the null every p-value is measured against")):
        if not len(embedded[role].records):
            raise MmiaError(f"no usable {name} ({why}): check the shard patterns and the skip "
                            "counts above")
    records = {role: r.records for role, r in embedded.items()}
    check_roles_disjoint(records, ROLE_PAIRS)
    candidate_table = records["candidates"]
    cache = EmbeddingCache(cfg.cache, loaded.fingerprint)
    feats: dict[str, Features | None] = {
        "evaluation": features_of(records["candidates"], cache, views),
        "known_nonmembers": features_of(records["known_nonmembers"], cache, views),
        "pool": features_of(records["pool"], cache, 0) if records.get("pool") else None}
    have = {"known_nonmembers": True, "pool": feats["pool"] is not None, "views": views > 0}
    skipped = skipped_attacks(acfg, have)
    notes = [f"attack {name} skipped: it {why}" for name, why in skipped.items()]
    scores, calibration = {}, {}
    for name in cfg.attacks:
        if name in skipped:
            continue
        try:
            run = run_attack(name, acfg, feats, np.empty(0))
        except Exception as exc:  # noqa: BLE001 - e.g. WSA finds no pseudo-member: a note
            log.debug("attack %s failed", name, exc_info=True)
            notes.append(f"attack {name} skipped: {first_line(exc)}")
            continue
        scores[name], calibration[name] = run.scores, run.calibration_scores
    if not scores:
        raise MmiaError("no attack could run: " + "; ".join(notes))
    candidates, known = feats["evaluation"], feats["known_nonmembers"]
    design, groups = _concat_design(candidates, known)
    is_candidate = np.r_[np.ones(len(candidates)), np.zeros(len(known))]
    shift = shift_check(design, is_candidate, groups, cfg.seed)
    tests, verdict = infer_core(scores, calibration, shift, cfg.alpha, cfg.target_fpr,
                                len(known))
    provenance = _provenance(loaded, cfg, embedded, notes, command, cache, views)
    shards = candidate_table.url().tolist()
    return InferResult(verdict, tests, shift, candidates,
                       [u if isinstance(u, str) and u else s
                        for u, s in zip(candidate_table.source_url, shards, strict=True)],
                       shards, notes, embedded, provenance, ImageLoader(candidate_table))


def _provenance(loaded, cfg: InferConfig, embedded: dict[str, EmbedResult],
                notes: list[str], command: str, cache: EmbeddingCache, views: int) -> dict:
    return {
        "model": {**loaded.description, "fingerprint": loaded.fingerprint},
        "data": data_provenance({role: getattr(cfg, role) for role in embedded}, embedded),
        "settings": {**settings_provenance(cfg, views, cache), "alpha": cfg.alpha,
                     "attacks": list(cfg.attacks)},
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ------------------------------------------------------------------ the report


def p_value_figure(tests: Mapping[str, AttackTest]) -> Figure:
    """Histogram of the candidates' p-values per attack: flat under the null, a peak near 0
    when some candidates are members."""
    fig = Figure(figsize=(4 * len(tests), 3))
    for i, (name, t) in enumerate(tests.items()):
        ax = fig.add_subplot(1, len(tests), i + 1)
        ax.hist(t.p_values, bins=np.linspace(0, 1, 21), color="tab:blue", alpha=0.8)
        ax.axhline(t.p_values.size / 20, color="k", ls="--", lw=0.8, label="null (uniform)")
        ax.set_title(name)
        ax.set_xlabel("conformal p-value")
        ax.legend(fontsize=8)
    return fig


def score_figure(tests: Mapping[str, AttackTest]) -> Figure:
    """Candidates' vs known non-members' score distributions per attack."""
    fig = Figure(figsize=(4 * len(tests), 3))
    for i, (name, t) in enumerate(tests.items()):
        ax = fig.add_subplot(1, len(tests), i + 1)
        bins = np.histogram_bin_edges(np.r_[t.scores, t.calibration], bins=30)
        ax.hist(t.calibration, bins=bins, alpha=0.6, density=True, label="known non-members")
        ax.hist(t.scores, bins=bins, alpha=0.6, density=True, label="candidates")
        if np.isfinite(t.threshold):
            ax.axvline(t.threshold, color="k", ls="--", lw=0.8, label="flag threshold")
        ax.set_title(name)
        ax.set_xlabel("score")
        ax.legend(fontsize=8)
    return fig


def top_candidates(result: InferResult, k: int = TOP_K) -> list[dict]:
    """The k highest-scoring candidates under the verdict's attack (smallest p-value first,
    highest score breaking ties), flagged or not, with thumbnails, for the report."""
    t = result.tests[result.verdict.attack]
    c = result.candidates
    order = np.lexsort((-t.scores, t.p_values))[:k]
    images = result.image_loader(order.tolist()) if result.image_loader else [None] * len(order)
    return [{"thumb": thumbnail(images[j]),
             "key": c.keys[i], "caption": c.captions[i], "score": f"{t.scores[i]:.4f}",
             "p": format_p(float(t.p_values[i])), "q": format_p(float(t.q_values[i])),
             "flagged": "yes" if t.flagged[i] else "no"} for j, i in enumerate(order)]


def render_report(result: InferResult) -> str:
    """report.html: the verdict sentence first, then the evidence (self-contained)."""
    v = result.verdict
    used = v.verdict == "used"
    attacks = [{"name": name, "mwu_p": format_p(t.mwu_p),
                "adjusted_p": format_p(min(1.0, t.mwu_p * len(result.tests))),
                "auc": f"{t.auc:.3f}", "flagged": int(t.flagged.sum()),
                "discoveries": int((t.q_values <= v.alpha).sum()),
                "bound": t.lower_bound if used else 0, "n_calibration": t.calibration.size}
               for name, t in result.tests.items()]
    return template(TEMPLATE).render(
        verdict=v, bound_percent=f"{v.members_lower_bound_level:.0%}", shift=result.shift,
        shift_level=SHIFT_LEVEL, format_p=format_p, attacks=attacks,
        target_fpr=result.provenance.get("settings", {}).get("target_fpr"),
        notes=result.notes, top=top_candidates(result), top_attack=v.attack,
        p_uri=data_uri(png(p_value_figure(result.tests))),
        score_uri=data_uri(png(score_figure(result.tests))),
        provenance=json.dumps(jsonable(result.provenance), indent=2, sort_keys=True))


def console_lines(result: InferResult) -> list[str]:
    """What `mmia infer` prints: the verdict sentence, then each attack in one line."""
    lines = [result.sentence]
    used = result.verdict.verdict == "used"
    for name, t in result.tests.items():
        lines.append(f"  {name}: Mann-Whitney p = {format_p(t.mwu_p)}, AUC vs known "
                     f"{t.auc:.3f}, {int(t.flagged.sum())} of {t.scores.size} flagged at the "
                     f"target FPR, members ≥ {t.lower_bound if used else 0}")
    s = result.shift
    lines.append("  shift check: " + (s.why if s.auc is None else
                                      f"blind AUC {s.auc:.3f} ({p_text(s.p_value)})"))
    return lines

