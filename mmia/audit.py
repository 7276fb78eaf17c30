"""`mmia audit`: embed what the cache lacks, run the attacks, evaluate honestly.

Thresholds come from known non-members the attack did not train on; the blind baseline runs
beside the attacks. `run_audit` returns an `AuditResult` and neither prints nor parses;
`AuditResult.write` writes the outputs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from mmia.attacks import ATTACKS, Attack, Features, make_attack
from mmia.attacks.aea import AGGREGATIONS, DEFAULT_AGGREGATION
from mmia.attacks.base import cosine
from mmia.attacks.mcd import DEFAULT_STATISTIC, STATISTICS
from mmia.attacks.rcsa import CALIBRATIONS, DEFAULT_CALIBRATION
from mmia.attacks.wsa import CLASSIFIERS, FEATURE_SETS
from mmia.cache import EmbeddingCache, key_hash, quarantined_since
from mmia.checks import check_attack_settings, check_embed_settings, check_fraction, check_int
from mmia.embed import EmbedResult, embed_shards
from mmia.errors import MmiaError
from mmia.metrics import evaluate
from mmia.modelref import LazyModel, ModelRequest
from mmia.report import write_outputs
from mmia.sample_index import ImageLoader, SampleRecord, SampleTable
from mmia.shards import is_remote, local_path
from mmia.variants import (
    MCD_DROPOUT,
    MCD_PASSES,
    WhiteboxNorms,
    dropout_passes,
    whitebox_features,
)

log = logging.getLogger(__name__)
ROLES = ("members", "nonmembers", "known_nonmembers", "pool")
EVALUATION_ROLES = ("members", "nonmembers")
ROLE_NAMES = {"members": "members", "nonmembers": "non-members",
              "known_nonmembers": "known non-members", "pool": "pool"}


@dataclass(kw_only=True)
class AttackSettings:
    """The settings `mmia audit` and `mmia infer` share: cache, embedding and attacks."""

    cache: str = ".mmia/cache"
    views: int = 10
    seed: int = 0
    target_fpr: float = 0.01
    batch_size: int = 32
    workers: int | None = None
    aea_aggregation: str = DEFAULT_AGGREGATION
    wsa_classifier: str = "mlp"
    wsa_lambda: float | str = "auto"  # or a number; auto: mmia.attacks.wsa's grid search
    wsa_features: str = "concat"  # or "concat_cos": [image ‖ text ‖ cosine] (Gomez)
    rcsa_calibration: str = DEFAULT_CALIBRATION
    mcd_passes: int = MCD_PASSES
    mcd_dropout: float = MCD_DROPOUT
    mcd_statistic: str = DEFAULT_STATISTIC
    calibration_fraction: float = 0.5
    progress: bool | Callable = False
    keep_view_features: bool = False
    threads: int | None = None

    def attack_settings(self) -> dict:
        """These settings as keyword arguments (to build another config from them)."""
        return {f.name: getattr(self, f.name) for f in fields(AttackSettings)}


@dataclass
class AuditConfig(AttackSettings):
    """Everything an audit needs besides the model (the settings after `pool`: keywords).

    `out` is where `AuditResult.write` puts the outputs (the CLI's --out).
    `calibration_fraction`: share of the known non-members held out of the fitting of attacks
    that learn from them (WSA), to set their threshold.
    `progress`: False, True (a tqdm bar on stderr) or a callable(done, counts) per chunk.
    `references`: reference models for rcsa (models that did not train on the evaluation
    samples), as load requests; their features are cached under their own fingerprints.
    """

    members: list[str]
    nonmembers: list[str]
    known_nonmembers: list[str] = field(default_factory=list)
    pool: list[str] = field(default_factory=list)
    attacks: tuple[str, ...] = ("csa", "aea", "wsa", "blind")
    out: str = "mmia-out"
    n_bootstrap: int = 1000
    references: tuple[ModelRequest, ...] = ()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse settings no audit can run with: one-line MmiaError, before any work."""
        check_embed_settings(self.views, self.batch_size, self.workers, self.threads)
        check_attack_settings(self.views, self.seed, self.n_bootstrap, self.wsa_lambda)
        check_fraction("--calibration-fraction", self.calibration_fraction)
        check_fraction("target_fpr", self.target_fpr)
        names = () if isinstance(self.attacks, str) else tuple(self.attacks)
        if not names or any(a not in ATTACKS for a in names):
            raise MmiaError(f"attacks must be names from {','.join(ATTACKS)}, "
                            f"got {self.attacks!r}")
        if self.aea_aggregation not in AGGREGATIONS:
            raise MmiaError(f"--aea-aggregation {self.aea_aggregation!r} is not one of "
                            f"{', '.join(AGGREGATIONS)}")
        if self.wsa_classifier not in CLASSIFIERS:
            raise MmiaError(f"--wsa-classifier {self.wsa_classifier!r} is not one of "
                            f"{', '.join(CLASSIFIERS)}")
        if self.wsa_features not in FEATURE_SETS:
            raise MmiaError(f"--wsa-features {self.wsa_features!r} is not one of "
                            f"{', '.join(FEATURE_SETS)}")
        check_companion_settings(self.rcsa_calibration, self.mcd_passes, self.mcd_dropout,
                                 self.mcd_statistic)
        if any(not isinstance(r, ModelRequest) for r in self.references):
            raise MmiaError("references must be mmia.modelref.ModelRequest values")


def check_companion_settings(calibration: object, passes: object, dropout: object,
                             statistic: object) -> None:
    """--rcsa-calibration, --mcd-passes (≥ 2), --mcd-dropout (in (0, 1)) and --mcd-statistic,
    or one line."""
    if calibration not in CALIBRATIONS:
        raise MmiaError(f"--rcsa-calibration {calibration!r} is not one of "
                        f"{', '.join(CALIBRATIONS)}")
    check_int("--mcd-passes", passes, 2)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0 < dropout < 1:
        raise MmiaError(f"--mcd-dropout must lie strictly between 0 and 1, got {dropout!r}")
    if statistic not in STATISTICS:
        raise MmiaError(f"--mcd-statistic {statistic!r} is not one of {', '.join(STATISTICS)}")


@dataclass
class AuditResult:
    """Everything an audit found; `write` turns it into the four output files."""

    metrics: dict
    scores: dict[str, np.ndarray]
    labels: np.ndarray
    keys: list[str]
    notes: list[str]
    embed: dict[str, EmbedResult]
    wsa_pseudo_member_keys: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    evaluation: dict | None = None  # for the report: "captions", "image_loader"

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write metrics.json, scores.csv, roc.png and report.html; return their paths."""
        return write_outputs(out_dir, self.metrics, self.scores, self.labels, self.keys,
                             self.provenance, samples=self.evaluation)


@dataclass
class AttackRun:
    """An attack's evaluation scores and the scores of the known non-members it is calibrated
    on, which it did not train on (None: no known non-members, or supervised on labels)."""

    attack: Attack
    scores: np.ndarray | None  # None: fitted, not scored yet
    calibration_scores: np.ndarray | None
    n_fit_known_nonmembers: int = 0


def parse_attacks(text: str) -> tuple[str, ...]:
    names = tuple(a.strip().lower() for a in text.split(",") if a.strip())
    unknown = [a for a in names if a not in ATTACKS]
    if unknown or not names:
        raise MmiaError(f"unknown attack(s) {unknown or text!r}: choose from {','.join(ATTACKS)}")
    return names


BLOCK_ROWS = 65_536  # evaluation samples whose features are read and scored at once


@dataclass
class RoleSamples:
    """A role's samples and the cache that holds their features, read in blocks on demand:
    nothing proportional to the role's size beyond its table is held."""

    table: SampleTable
    cache: EmbeddingCache
    views: int = 0
    companions: dict[str, tuple[EmbeddingCache, ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def keys(self) -> list[str]:
        return self.table.key.tolist()

    def features(self, rows: np.ndarray | None = None, reuse: Features | None = None) -> Features:
        """Features of the samples at `rows` (all when None); `reuse`: an earlier result whose
        image and text arrays are overwritten with these (no new memory per block)."""
        t = self.table if rows is None else self.table.take(rows)
        views = None
        if self.views:
            views = self.cache.pairs(self.views).read(t.pair_digest)
        extra = {name: companion_features(name, caches, t)
                 for name, caches in self.companions.items()}
        image = self.cache.image(0).read(t.image_digest, None if reuse is None else reuse.image)
        text = self.cache.text.read(t.caption_digest, None if reuse is None else reuse.text)
        return Features(keys=t.key.tolist(), image=image, text=text, view_cosines=views,
                        captions=t.caption.tolist(), groups=t.image_digest.tolist(),
                        image_stats=t.stats, **extra)

    def blocks(self, size: int = BLOCK_ROWS) -> Iterator[Features]:
        """The features block by block: each block's image and text arrays are overwritten by
        the next block's, so use a block before asking for the next."""
        block = None
        for start in range(0, len(self), size):
            block = self.features(np.arange(start, min(start + size, len(self))), block)
            yield block

    def design(self) -> Features:
        """What the blind baseline reads: captions, image statistics and content groups only."""
        t, empty = self.table, np.empty((len(self), 0), np.float32)
        return Features(keys=t.key.tolist(), image=empty, text=empty,
                        captions=t.caption.tolist(), groups=t.image_digest.tolist(),
                        image_stats=t.stats)


def companion_features(name: str, caches: tuple[EmbeddingCache, ...],
                       table: SampleTable) -> np.ndarray:
    """A Features field read from companion models' caches: the white-box norms, or each
    model's image-caption cosine (reference models, MC-dropout passes) as a column."""
    if name == "whitebox":
        return whitebox_features(caches[0].image(0).read(table.image_digest),
                                 caches[0].text.read(table.caption_digest))
    return np.stack([cosine(c.image(0).read(table.image_digest),
                            c.text.read(table.caption_digest)) for c in caches], axis=1)


def features_of(records, cache: EmbeddingCache, views: int) -> Features:
    """All features of a (small) role at once: `RoleSamples(...).features()`."""
    table = records if isinstance(records, SampleTable) else SampleTable.from_records(records)
    return RoleSamples(table, cache, views).features()


def score_all(attack: Attack, samples: RoleSamples | Features) -> np.ndarray:
    """The attack's scores of every sample, block by block."""
    if isinstance(samples, Features):
        return attack.score(samples)
    parts = [attack.score(block) for block in samples.blocks()]
    return np.concatenate(parts) if parts else np.empty(0)


def content_hashes(table: SampleTable) -> np.ndarray:
    """A 64-bit hash of each sample's image and caption digests (`key_hash` of each, mixed):
    what content comparisons sort and search by; equal hashes are confirmed on the digests."""
    with np.errstate(over="ignore"):
        return key_hash(table.image_digest) * np.uint64(0x9E3779B97F4A7C15) \
            + key_hash(table.caption_digest)


def _content(table: SampleTable, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
    return np.char.add(table.image_digest[rows], table.caption_digest[rows])


def first_of_each_content(table: SampleTable) -> np.ndarray:
    """Sorted rows of the first sample of each distinct (image, caption) content."""
    hashes = content_hashes(table)
    order = np.argsort(hashes, kind="stable")
    ascending = hashes[order]
    same = np.flatnonzero(ascending[1:] == ascending[:-1])  # rows order[i], order[i + 1]
    if (_content(table, order[same]) != _content(table, order[same + 1])).any():
        _, first = np.unique(_content(table), return_index=True)  # a hash collision: exact
        return np.sort(first)
    keep = np.ones(len(table), bool)
    keep[order[same + 1]] = False  # stable: the first row of a content is kept
    return np.flatnonzero(keep)


def _in_sorted(values: np.ndarray, ascending: np.ndarray) -> np.ndarray:
    """Whether each value is in the sorted array `ascending` (one binary search each)."""
    if not len(ascending):
        return np.zeros(len(values), bool)
    at = np.minimum(np.searchsorted(ascending, values), len(ascending) - 1)
    return ascending[at] == values


def content_in(a: SampleTable, b: SampleTable) -> np.ndarray:
    """Whether each sample of `a` has the image and caption of some sample of `b` (by hash,
    each candidate confirmed on its digests)."""
    hashes_a, hashes_b = content_hashes(a), content_hashes(b)
    found = np.zeros(len(a), bool)
    candidates = np.flatnonzero(_in_sorted(hashes_a, np.sort(hashes_b)))
    if len(candidates):
        others = np.flatnonzero(_in_sorted(hashes_b, np.sort(hashes_a[candidates])))
        found[candidates] = np.isin(_content(a, candidates), _content(b, others))
    return found


def drop_duplicate_content(result: EmbedResult) -> None:
    """Keep the first of samples with the same image and caption; count the rest as skips."""
    table = result.records
    if not len(table):
        return
    first = first_of_each_content(table)
    if len(first) < len(table):
        result.skips["duplicate_content"] += len(table) - len(first)
        result.records = table.take(first)


def _shard_identities(urls: list[str]) -> np.ndarray:
    return np.array([url if not url or is_remote(url) else os.path.realpath(local_path(url))
                     for url in urls], dtype=object)


def _same_shard_and_key(a: SampleTable, b: SampleTable) -> np.ndarray:
    """Which samples of `a` have a sample of `b` with their key in the same shard file."""
    ids_a, ids_b = _shard_identities(a.urls), _shard_identities(b.urls)
    found = np.zeros(len(a), bool)
    for ident in set(ids_a) & set(ids_b):
        rows_a = np.flatnonzero(np.isin(a.shard, np.flatnonzero(ids_a == ident)))
        rows_b = np.flatnonzero(np.isin(b.shard, np.flatnonzero(ids_b == ident)))
        found[rows_a] = np.isin(a.key[rows_a], b.key[rows_b])
    return found


def _overlap(a: SampleTable, b: SampleTable) -> tuple[int, int, int, str] | None:
    """(count, first row of a, its row in b, how they match) for samples of `a` also in `b`:
    by shard file and key, or by image and caption digest (vectorised)."""
    same_key = _same_shard_and_key(a, b)
    found = same_key | content_in(a, b)
    if not found.any():
        return None
    row = int(np.flatnonzero(found)[0])
    if same_key[row]:
        other = int(np.flatnonzero(b.key == a.key[row])[0])
        how = "the same shard and key"
    else:
        other = int(np.flatnonzero(_content(b) == _content(a, [row])[0])[0])
        how = "the same image and caption"
    return int(found.sum()), row, other, how


# (role, other role, why the overlap is an error) for every pair of roles
ROLE_PAIRS = (
    ("nonmembers", "members",
     "a sample cannot be both a member and a non-member: de-duplicate the two sets"),
    ("known_nonmembers", "members",
     "known non-members that are members would bias the calibration: "
     "remove them from --known-nonmembers"),
    ("known_nonmembers", "nonmembers",
     "evaluation samples would leak into the attacks' fitting and calibration: "
     "remove them from --known-nonmembers"),
    ("pool", "members",
     "evaluation samples would leak into WSA's training: remove them from --pool"),
    ("pool", "nonmembers",
     "evaluation samples would leak into WSA's training: remove them from --pool"),
    ("pool", "known_nonmembers",
     "WSA could train on the known non-members it is calibrated on: remove them from --pool"),
)


def check_roles_disjoint(records: dict[str, SampleTable | list[SampleRecord]],
                         pairs: tuple[tuple[str, str, str], ...] = ROLE_PAIRS) -> None:
    """Raise MmiaError (one line: count and an example) when two roles share a sample, by
    shard file and key or by content. `pairs`: (role, other role, why), default the audit's."""
    tables = {role: recs if isinstance(recs, SampleTable) else SampleTable.from_records(recs)
              for role, recs in records.items()}
    for role, other, why in pairs:
        if role not in tables or other not in tables:
            continue
        found = _overlap(tables[role], tables[other])
        if found:
            count, row, other_row, how = found
            key, other_key = tables[role].key[row], tables[other].key[other_row]
            name, other_name = (ROLE_NAMES.get(r, r.replace("_", " ")) for r in (role, other))
            raise MmiaError(
                f"{count} sample(s) of the {name} are also {other_name} "
                f"(e.g. {key!r} has {how} as {other_key!r}): {why}")


def check_disjoint(members, nonmembers) -> None:
    """Members and non-members share no sample (by shard and key, or by content)."""
    check_roles_disjoint({"members": members, "nonmembers": nonmembers})


def split_known_nonmembers(known: Features, fraction: float,
                           seed: int) -> tuple[Features, Features]:
    """Seeded split of the known non-members into (fitting part, calibration part)."""
    n_cal = int(round(fraction * len(known)))
    if n_cal < 1 or n_cal >= len(known):
        raise MmiaError(
            f"cannot hold out {fraction:.0%} of {len(known)} known non-members for calibration "
            "and fit on the rest: give more known non-members")
    order = np.random.default_rng(seed).permutation(len(known))
    return known.subset(np.sort(order[n_cal:])), known.subset(np.sort(order[:n_cal]))


def fit_attack(name: str, cfg: AttackSettings, feats: dict,
               labels: np.ndarray) -> AttackRun:
    """Fit one attack and score the known non-members it did not train on (its calibration);
    the evaluation set is scored afterwards, by `score_runs` (the blind baseline, supervised on
    the evaluation labels, gets its cross-validated scores here)."""
    # white-box negatives from the pool where there is one: every known non-member calibrates
    whitebox_params = {"negatives": "pool" if feats["pool"] is not None else "known_nonmembers",
                       "seed": cfg.seed}
    params = {"aea": {"aggregation": cfg.aea_aggregation},
              "wsa": {"classifier": cfg.wsa_classifier, "lam": cfg.wsa_lambda,
                      "features": cfg.wsa_features,
                      "seed": cfg.seed},
              "rcsa": {"calibration": cfg.rcsa_calibration},
              "mcd": {"statistic": cfg.mcd_statistic},
              "loss": whitebox_params, "grad": whitebox_params}.get(name, {})
    attack = make_attack(name, **params)
    evaluation = feats["evaluation"]
    if "labels" in attack.requires:  # the blind baseline: cross-validated on evaluation labels
        design = evaluation.design() if isinstance(evaluation, RoleSamples) else evaluation
        scores = attack.cross_val_scores(design, labels, seed=cfg.seed)
        return AttackRun(attack, scores, None)
    known = feats["known_nonmembers"]
    fit_known = calibration = known
    if known is not None and attack.learns_from_known_nonmembers:
        fit_known, calibration = split_known_nonmembers(known, cfg.calibration_fraction,
                                                        cfg.seed)
    attack.fit(known_nonmembers=fit_known, pool=feats["pool"])
    n_fit = len(fit_known) if attack.learns_from_known_nonmembers else 0
    calibration_scores = attack.score(calibration) if calibration is not None else None
    return AttackRun(attack, None, calibration_scores, n_fit)


def score_runs(runs: dict[str, AttackRun], evaluation: RoleSamples | Features) -> dict[str, str]:
    """Score the evaluation set with every fitted attack that has no scores yet, in ONE pass
    over its features (block by block); {attack: why} for those that failed (dropped)."""
    todo = {name: run for name, run in runs.items() if run.scores is None}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in todo}
    failed: dict[str, str] = {}
    blocks = [evaluation] if isinstance(evaluation, Features) else evaluation.blocks()
    for block in blocks if todo else []:
        for name, run in todo.items():
            if name in failed:
                continue
            try:
                parts[name].append(run.attack.score(block))
            except Exception as exc:  # noqa: BLE001 - an attack that cannot score is a note
                log.debug("attack %s failed", name, exc_info=True)
                failed[name] = first_line(exc)
    for name, run in todo.items():
        if name in failed:
            del runs[name]
        else:
            run.scores = np.concatenate(parts[name]) if parts[name] else np.empty(0)
    return failed


def run_attack(name: str, cfg: AttackSettings, feats: dict, labels: np.ndarray) -> AttackRun:
    """Fit and score one attack; calibrate it on known non-members it did not train on.

    feats: "evaluation" (RoleSamples, scored in blocks, or Features), "known_nonmembers" and
    "pool" (Features or None)."""
    run = fit_attack(name, cfg, feats, labels)
    failed = score_runs({name: run}, feats["evaluation"])
    if failed:
        raise MmiaError(failed[name])
    return run


def skipped_attacks(cfg: AuditConfig, have: dict[str, bool]) -> dict[str, str]:
    """Attacks whose inputs are missing, with the reason."""
    reasons = {}
    for name in cfg.attacks:
        needs = [r for r in ATTACKS[name].requires
                 if r in ("known_nonmembers", "pool", "views", "references", "mcd", "whitebox")]
        missing = [r for r in needs if not have.get(r)]
        if "views" in missing:
            reasons[name] = "needs --views ≥ 1"
        elif "references" in missing:
            reasons[name] = "needs reference models: --reference CKPT (repeatable)"
        elif missing:
            reasons[name] = "needs " + ", ".join("--" + m.replace("_", "-") for m in missing)
    return reasons


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def attack_metrics(run: AttackRun, cfg: AuditConfig, labels: np.ndarray) -> dict:
    """`mmia.metrics.evaluate` of one attack run, plus what the attack learned."""
    m = evaluate(labels, run.scores, run.calibration_scores, target_fpr=cfg.target_fpr,
                 n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
    m["n_known_nonmembers_fit"] = run.n_fit_known_nonmembers
    if run.calibration_scores is not None:  # all known non-members: fitted on + calibrated on
        m["n_known_nonmembers"] = run.n_fit_known_nonmembers + len(run.calibration_scores)
    attack = run.attack
    if attack.name == "wsa":
        m.update(wsa_lambda=float(attack.lam_), wsa_lambda_auto=attack.auto,
                 wsa_min_pseudo_members=attack.min_pseudo_members if attack.auto else None,
                 wsa_features=attack.features,
                 n_pseudo_members=int(attack.n_pseudo_members_),
                 wsa_threshold=float(attack.threshold_), wsa_known_csa_mean=attack.mu_,
                 wsa_known_csa_std=attack.sigma_, wsa_epochs=attack.epochs_run_)
    if attack.name in ("loss", "grad"):
        m.update(whitebox_negatives=attack.negatives,
                 n_whitebox_negatives=len(attack.negative_text_))
    if attack.name == "rcsa":
        m.update(rcsa_calibration=attack.calibration, rcsa_spread=attack.spread_,
                 rcsa_coef=None if attack.coef_ is None else [float(c) for c in attack.coef_])
    return m


def embed_role(loaded, cfg: AttackSettings, role: str, patterns: list[str],
               views: int) -> EmbedResult:
    """Embed (or find cached) one role's samples; duplicates by content counted and dropped."""
    log.info("embedding %s …", role)
    result = embed_shards(loaded, patterns, cfg.cache, views=views, batch_size=cfg.batch_size,
                          workers=cfg.workers, progress=cfg.progress,
                          keep_view_features=cfg.keep_view_features, threads=cfg.threads)
    drop_duplicate_content(result)
    log.info("%s: %s", role, result.summary().replace("\n", f"\n{role}: "))
    return result


COMPANION_ROLES = ("members", "nonmembers", "known_nonmembers")  # what rcsa, mcd, loss read


def reference_models(cfg: AuditConfig, target_fingerprint: str) -> list[LazyModel]:
    """The reference models rcsa compares the target with; a reference with the target's own
    fingerprint is refused: it would calibrate the target by itself."""
    models = [LazyModel(request, cfg.cache) for request in cfg.references]
    for request, model in zip(cfg.references, models, strict=True):
        if model.fingerprint == target_fingerprint:
            raise MmiaError(f"reference {request.pretrained or request.name!r} is the target "
                            "model itself: a reference must not have trained on the "
                            "evaluation samples")
    return models


# the models besides the target, by the Features field they fill, and the attacks reading it
COMPANIONS = {"ref_cosines": ("rcsa",), "mcd_cosines": ("mcd",), "whitebox": ("loss", "grad")}


def companion_group(name: str, cfg: AuditConfig, loaded) -> list:
    """Reference models (rcsa), MC-dropout passes of the target (mcd), or the target's
    projection norms (loss, grad)."""
    if name == "ref_cosines":
        return reference_models(cfg, loaded.fingerprint)
    if name == "mcd_cosines":
        return dropout_passes(loaded, cfg.mcd_passes, cfg.mcd_dropout)
    return [WhiteboxNorms(loaded)]


def companion_models(cfg: AuditConfig, loaded) -> tuple[dict[str, list], dict[str, str]]:
    """The companion models the chosen attacks read, by field, and {field: why} for those that
    cannot be made (their attacks are skipped; the others run)."""
    models: dict[str, list] = {}
    failed: dict[str, str] = {}
    for name, attacks in COMPANIONS.items():
        if not set(attacks) & set(cfg.attacks) or (name == "ref_cosines" and not cfg.references):
            continue
        try:
            models[name] = companion_group(name, cfg, loaded)
        except MmiaError as exc:
            failed[name] = first_line(exc)
    return models, failed


def companion_jobs(cfg: AuditConfig, models: dict[str, list]) -> list[tuple[object, str, list]]:
    """(model, what to call it, shard patterns) of every embedding the companion `models`
    (`companion_models`) must make."""
    what = {"ref_cosines": "reference", "mcd_cosines": "dropout pass", "whitebox": "white-box"}
    return [(model, f"{role} ({what[name]} {i + 1})", list(getattr(cfg, role)))
            for name, group in models.items()
            for i, model in enumerate(group)
            for role in COMPANION_ROLES if getattr(cfg, role)]


def embed_companions(cfg: AuditConfig,
                     loaded) -> tuple[dict[str, tuple[EmbeddingCache, ...]], dict[str, str]]:
    """Embed (or find cached) what the companion models must give: their caches by field, and
    {field: why} for those that failed (a model that cannot be built or embedded with)."""
    models, failed = companion_models(cfg, loaded)
    caches = {}
    for name, group in models.items():
        try:
            for model, role, patterns in companion_jobs(cfg, {name: group}):
                embed_role(model, cfg, role, patterns, 0)
        except MmiaError as exc:
            failed[name] = first_line(exc)
            continue
        caches[name] = tuple(EmbeddingCache(cfg.cache, m.fingerprint) for m in group)
    return caches, failed


def reference_provenance(cfg: AuditConfig, companions: dict) -> list[dict]:
    """Each reference model rcsa used: its load request and fingerprint."""
    refs = companions.get("ref_cosines", ())
    if not refs:
        return []
    return [{**dataclasses.asdict(request), "fingerprint": ref.fingerprint}
            for request, ref in zip(cfg.references, refs, strict=True)]


def role_views(role: str, views: int) -> int:
    """Views a role needs: none for the pool (only WSA reads it, from view 0)."""
    return 0 if role == "pool" else views


def run_audit(loaded, cfg: AuditConfig, command: str = "") -> AuditResult:
    """Embed every role, run the attacks and evaluate them; writes nothing (see `write`).

    loaded: a `LoadedModel` or a `mmia.modelref.LazyModel` (built only if something must be
    embedded)."""
    started = time.time() - 1.0  # quarantine records' mtimes have whole-second granularity
    roles = {r: getattr(cfg, r) for r in ROLES}
    views = cfg.views if "aea" in cfg.attacks else 0
    embedded = {role: embed_role(loaded, cfg, role, patterns, role_views(role, views))
                for role, patterns in roles.items() if patterns}
    members, nonmembers = embedded["members"].records, embedded["nonmembers"].records
    if not len(members) or not len(nonmembers):
        which = "members" if not len(members) else "non-members"
        raise MmiaError(f"no usable {which} in the evaluation set: check the shard patterns "
                        "and the skip counts above")
    check_roles_disjoint({role: r.records for role, r in embedded.items()})
    cache = EmbeddingCache(cfg.cache, loaded.fingerprint)
    companions, companion_failures = embed_companions(cfg, loaded)
    records = SampleTable.concat([members, nonmembers])
    labels = np.r_[np.ones(len(members), np.int64), np.zeros(len(nonmembers), np.int64)]
    evaluation = RoleSamples(records, cache, views, companions)
    feats: dict = {"evaluation": evaluation}
    for role in ("known_nonmembers", "pool"):
        recs = embedded[role].records if role in embedded else SampleTable.empty()
        feats[role] = RoleSamples(recs, cache, role_views(role, views),
                                  companions if role in COMPANION_ROLES else {}).features() \
            if len(recs) else None
    have = {"known_nonmembers": feats["known_nonmembers"] is not None,
            "pool": feats["pool"] is not None, "views": views > 0,
            "references": "ref_cosines" in companions, "mcd": "mcd_cosines" in companions,
            "whitebox": "whitebox" in companions}
    skipped = skipped_attacks(cfg, have)
    skipped.update({name: f"could not use its companion models: {why}"
                    for field_name, why in companion_failures.items()
                    for name in COMPANIONS[field_name] if name in cfg.attacks})
    notes = [f"attack {name} skipped: it {why}" for name, why in skipped.items()]
    runs: dict[str, AttackRun] = {}
    for name in cfg.attacks:
        if name in skipped:
            continue
        try:
            runs[name] = fit_attack(name, cfg, feats, labels)
        except Exception as exc:  # noqa: BLE001 - an attack that cannot run becomes a note
            log.debug("attack %s failed", name, exc_info=True)
            notes.append(f"attack {name} skipped: {first_line(exc)}")
    notes += [f"attack {name} skipped: {why}"
              for name, why in score_runs(runs, evaluation).items()]
    metrics: dict[str, dict] = {}
    scores: dict[str, np.ndarray] = {}
    pseudo_keys: list[str] = []
    for name, run in runs.items():
        try:
            metrics[name] = attack_metrics(run, cfg, labels)
        except Exception as exc:  # noqa: BLE001
            log.debug("attack %s failed", name, exc_info=True)
            notes.append(f"attack {name} skipped: {first_line(exc)}")
            continue
        scores[name] = run.scores
        if name == "wsa":
            pseudo_keys = [feats["pool"].keys[i] for i in run.attack.pseudo_member_idx_]
    if not scores:
        raise MmiaError("no attack could run: " + "; ".join(notes))
    quarantined = quarantined_since(cache.folder, started)
    if quarantined:
        notes.append(f"{len(quarantined)} damaged cache segment(s) were quarantined and their "
                     f"samples embedded again (e.g. {quarantined[0]})")
    provenance = {
        "model": {**loaded.description, "fingerprint": loaded.fingerprint},
        "data": data_provenance(roles, embedded),
        "skipped": {role: sum(r.skips.values()) for role, r in embedded.items()},
        "cache": {"quarantined_segments": quarantined},
        "notes": notes,
        "settings": {**settings_provenance(cfg, views, cache), "n_bootstrap": cfg.n_bootstrap,
                     "references": reference_provenance(cfg, companions)},
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    samples = {"captions": records.caption.tolist(), "image_loader": ImageLoader(records)}
    return AuditResult(metrics, scores, labels, records.key.tolist(), notes, embedded,
                       pseudo_keys, provenance, samples)


def settings_provenance(cfg: AttackSettings, views: int, cache: EmbeddingCache) -> dict:
    """The attack settings an audit or an inference ran with, for its provenance."""
    return {"seed": cfg.seed, "views": views, "target_fpr": cfg.target_fpr,
            "aea_aggregation": cfg.aea_aggregation, "wsa_classifier": cfg.wsa_classifier,
            "wsa_lambda": cfg.wsa_lambda, "wsa_features": cfg.wsa_features,
            "rcsa_calibration": cfg.rcsa_calibration, "mcd_passes": cfg.mcd_passes,
            "mcd_dropout": cfg.mcd_dropout, "mcd_statistic": cfg.mcd_statistic,
            "calibration_fraction": cfg.calibration_fraction,
            "augment": cache.augment.__dict__}


def data_provenance(patterns: dict[str, list[str]], embedded: dict[str, EmbedResult]) -> dict:
    """Per role: its patterns, samples, skips and warnings (counts and examples), shards."""
    return {role: {"patterns": patterns[role], "samples": len(r.records),
                   "skipped": dict(r.skips), "warnings": dict(r.warnings),
                   "skip_examples": r.skip_examples, "shards": r.shards,
                   "shards_read": r.shards_read}
            for role, r in embedded.items()}


def format_table(rows: list[tuple[str, str, dict]]) -> str:
    """Markdown table per protocol and attack: ROC figures on the evaluation set (oracle
    thresholds) and the calibrated decision (threshold from known non-members), each with
    its 95 % interval ([–] where none is valid)."""

    def cell(m: dict, k: str) -> str:
        ci = m.get("ci95", {}).get(k)
        value = m.get(k)
        text = "n/a" if value is None else f"{value:.3f}"
        return text + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else " [–]")

    lines = ["| protocol | attack | AUC | TPR@1%FPR (ROC) | TPR@0.1%FPR (ROC) | "
             "TPR at calibrated threshold | achieved FPR |",
             "|---|---|---|---|---|---|---|"]
    for protocol, name, m in rows:
        lines.append(f"| {protocol} | {name} | {cell(m, 'auc')} | {cell(m, 'tpr@1%fpr')} | "
                     f"{cell(m, 'tpr@0.1%fpr')} | {cell(m, 'tpr_at_threshold')} | "
                     f"{cell(m, 'achieved_fpr')} |")
    return "\n".join(lines)
