"""`mmia audit`: embed what the cache lacks, run the attacks, evaluate honestly.

Thresholds come from known non-members the attack did not train on; the blind baseline runs
beside the attacks. `run_audit` returns an `AuditResult` and neither prints nor parses;
`AuditResult.write` writes the outputs.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from mmia.attacks import ATTACKS, Attack, Features, make_attack
from mmia.attacks.aea import AGGREGATIONS, DEFAULT_AGGREGATION
from mmia.attacks.wsa import CLASSIFIERS
from mmia.cache import EmbeddingCache
from mmia.checks import check_attack_settings, check_embed_settings, check_fraction
from mmia.embed import EmbedResult, SampleRecord, embed_shards
from mmia.errors import MmiaError
from mmia.metrics import evaluate
from mmia.model import LoadedModel
from mmia.report import write_outputs
from mmia.shards import is_remote, local_path

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
    wsa_lambda: float = 1.5
    calibration_fraction: float = 0.5
    progress: bool | Callable = False

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
    """

    members: list[str]
    nonmembers: list[str]
    known_nonmembers: list[str] = field(default_factory=list)
    pool: list[str] = field(default_factory=list)
    attacks: tuple[str, ...] = ("csa", "aea", "wsa", "blind")
    out: str = "mmia-out"
    n_bootstrap: int = 1000

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse settings no audit can run with: one-line MmiaError, before any work."""
        check_embed_settings(self.views, self.batch_size, self.workers)
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
    evaluation: Features | None = None

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write metrics.json, scores.csv, roc.png and report.html; return their paths."""
        return write_outputs(out_dir, self.metrics, self.scores, self.labels, self.keys,
                             self.provenance, samples=self.evaluation)


@dataclass
class AttackRun:
    """An attack's evaluation scores and the scores of the known non-members it is calibrated
    on, which it did not train on (None: no known non-members, or supervised on labels)."""

    attack: Attack
    scores: np.ndarray
    calibration_scores: np.ndarray | None
    n_fit_known_nonmembers: int = 0


def parse_attacks(text: str) -> tuple[str, ...]:
    names = tuple(a.strip().lower() for a in text.split(",") if a.strip())
    unknown = [a for a in names if a not in ATTACKS]
    if unknown or not names:
        raise MmiaError(f"unknown attack(s) {unknown or text!r}: choose from {','.join(ATTACKS)}")
    return names


def features_of(records: list[SampleRecord], cache: EmbeddingCache, views: int) -> Features:
    img = [r.image_digest for r in records]
    return Features(
        keys=[r.key for r in records],
        image=cache.read_image(img, [0])[:, 0] if records else np.empty((0, 0), np.float32),
        text=cache.read_text([r.caption_digest for r in records])
        if records else np.empty((0, 0), np.float32),
        views=cache.read_image(img, range(1, views + 1)) if views and records else None,
        captions=[r.caption for r in records],
        image_bytes=[r.image_bytes for r in records],
        groups=[r.image_digest for r in records],
    )


def drop_duplicate_content(result: EmbedResult) -> None:
    """Keep the first of samples with the same image and caption; count the rest as skips."""
    seen: set[tuple[str, str]] = set()
    unique = []
    for r in result.records:
        content = (r.image_digest, r.caption_digest)
        if content not in seen:
            seen.add(content)
            unique.append(r)
    if len(unique) < len(result.records):
        result.skips["duplicate_content"] += len(result.records) - len(unique)
        result.records = unique


@functools.lru_cache(maxsize=65536)
def _shard_identity(url: str) -> str:
    return url if not url or is_remote(url) else os.path.realpath(local_path(url))


def _role_index(records: list[SampleRecord]) -> tuple[dict, dict]:
    """A role's samples by (shard file, key) and by (image, caption) digest."""
    return ({(_shard_identity(r.url), r.key): r.key for r in records},
            {(r.image_digest, r.caption_digest): r.key for r in records})


def _overlap(a: list[SampleRecord], index: tuple[dict, dict]) -> list[tuple[str, str, str]]:
    """Samples of `a` that are also in the indexed role: (key in a, key there, how they match)."""
    by_key, by_content = index
    found = []
    for r in a:
        other = by_key.get((_shard_identity(r.url), r.key))
        if other is not None:
            found.append((r.key, other, "the same shard and key"))
            continue
        other = by_content.get((r.image_digest, r.caption_digest))
        if other is not None:
            found.append((r.key, other, "the same image and caption"))
    return found


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


def check_roles_disjoint(records: dict[str, list[SampleRecord]],
                         pairs: tuple[tuple[str, str, str], ...] = ROLE_PAIRS) -> None:
    """Raise MmiaError (one line: count and an example) when two roles share a sample, by
    shard file and key or by content. `pairs`: (role, other role, why), default the audit's."""
    index = {role: _role_index(recs) for role, recs in records.items()}  # each built once
    for role, other, why in pairs:
        if role not in records or other not in records:
            continue
        found = _overlap(records[role], index[other])
        if found:
            key, other_key, how = found[0]
            name, other_name = (ROLE_NAMES.get(r, r.replace("_", " ")) for r in (role, other))
            raise MmiaError(
                f"{len(found)} sample(s) of the {name} are also {other_name} "
                f"(e.g. {key!r} has {how} as {other_key!r}): {why}")


def check_disjoint(members: list[SampleRecord], nonmembers: list[SampleRecord]) -> None:
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


def run_attack(name: str, cfg: AuditConfig, feats: dict[str, Features | None],
               labels: np.ndarray) -> AttackRun:
    """Fit and score one attack; calibrate it on known non-members it did not train on."""
    params = {"aea": {"aggregation": cfg.aea_aggregation},
              "wsa": {"classifier": cfg.wsa_classifier, "lam": cfg.wsa_lambda,
                      "seed": cfg.seed}}.get(name, {})
    attack = make_attack(name, **params)
    evaluation = feats["evaluation"]
    if "labels" in attack.requires:  # the blind baseline: cross-validated on evaluation labels
        scores = attack.cross_val_scores(evaluation, labels, seed=cfg.seed)
        return AttackRun(attack, scores, None)
    known = feats["known_nonmembers"]
    fit_known = calibration = known
    if known is not None and attack.learns_from_known_nonmembers:
        fit_known, calibration = split_known_nonmembers(known, cfg.calibration_fraction,
                                                        cfg.seed)
    attack.fit(known_nonmembers=fit_known, pool=feats["pool"])
    n_fit = len(fit_known) if attack.learns_from_known_nonmembers else 0
    calibration_scores = attack.score(calibration) if calibration is not None else None
    return AttackRun(attack, attack.score(evaluation), calibration_scores, n_fit)


def skipped_attacks(cfg: AuditConfig, have: dict[str, bool]) -> dict[str, str]:
    """Attacks whose inputs are missing, with the reason."""
    reasons = {}
    for name in cfg.attacks:
        needs = [r for r in ATTACKS[name].requires if r in ("known_nonmembers", "pool", "views")]
        missing = [r for r in needs if not have.get(r)]
        if missing:
            flags = ", ".join("--" + m.replace("_", "-") for m in missing)
            reasons[name] = f"needs {flags}" if "views" not in missing else "needs --views ≥ 1"
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
        m.update(n_pseudo_members=int(attack.n_pseudo_members_),
                 wsa_threshold=float(attack.threshold_), wsa_known_csa_mean=attack.mu_,
                 wsa_known_csa_std=attack.sigma_, wsa_epochs=attack.epochs_run_)
    return m


def run_audit(loaded: LoadedModel, cfg: AuditConfig, command: str = "") -> AuditResult:
    """Embed every role, run the attacks and evaluate them; writes nothing (see `write`)."""
    roles = {r: getattr(cfg, r) for r in ROLES}
    views = cfg.views if "aea" in cfg.attacks else 0
    keep = "blind" in cfg.attacks
    embedded: dict[str, EmbedResult] = {}
    for role, patterns in roles.items():
        if patterns:
            log.info("embedding %s …", role)
            embedded[role] = embed_shards(  # the pool needs no views, only WSA reads it
                loaded, patterns, cfg.cache, views=0 if role == "pool" else views,
                batch_size=cfg.batch_size, workers=cfg.workers, progress=cfg.progress,
                keep_images=keep and role in EVALUATION_ROLES)
            drop_duplicate_content(embedded[role])
            log.info("%s: %s", role, embedded[role].summary().replace("\n", f"\n{role}: "))
    members, nonmembers = embedded["members"].records, embedded["nonmembers"].records
    if not members or not nonmembers:
        which = "members" if not members else "non-members"
        raise MmiaError(f"no usable {which} in the evaluation set: check the shard patterns "
                        "and the skip counts above")
    check_roles_disjoint({role: r.records for role, r in embedded.items()})
    cache = EmbeddingCache(cfg.cache, loaded.fingerprint)
    records = members + nonmembers
    labels = np.array([1] * len(members) + [0] * len(nonmembers))
    feats: dict[str, Features | None] = {"evaluation": features_of(records, cache, views)}
    for role, role_views in (("known_nonmembers", views), ("pool", 0)):
        recs = embedded[role].records if role in embedded else []
        feats[role] = features_of(recs, cache, role_views) if recs else None
    have = {"known_nonmembers": feats["known_nonmembers"] is not None,
            "pool": feats["pool"] is not None, "views": views > 0}
    skipped = skipped_attacks(cfg, have)
    notes = [f"attack {name} skipped: it {why}" for name, why in skipped.items()]
    metrics: dict[str, dict] = {}
    scores: dict[str, np.ndarray] = {}
    pseudo_keys: list[str] = []
    for name in cfg.attacks:
        if name in skipped:
            continue
        try:
            run = run_attack(name, cfg, feats, labels)
            metrics[name] = attack_metrics(run, cfg, labels)
        except Exception as exc:  # noqa: BLE001 - an attack that cannot run becomes a note
            log.debug("attack %s failed", name, exc_info=True)
            notes.append(f"attack {name} skipped: {first_line(exc)}")
            continue
        scores[name] = run.scores
        if name == "wsa":
            pseudo_keys = [feats["pool"].keys[i] for i in run.attack.pseudo_member_idx_]
    if not scores:
        raise MmiaError("no attack could run: " + "; ".join(notes))
    skips = {role: dict(r.skips) for role, r in embedded.items()}
    provenance = {
        "model": {**loaded.description, "fingerprint": loaded.fingerprint},
        "data": {role: {"patterns": p, "samples": len(embedded[role].records),
                        "skipped": skips[role], "warnings": dict(embedded[role].warnings),
                        "skip_examples": embedded[role].skip_examples}
                 for role, p in roles.items() if p},
        "skipped": {role: sum(c.values()) for role, c in skips.items()},
        "notes": notes,
        "settings": {"seed": cfg.seed, "views": views, "target_fpr": cfg.target_fpr,
                     "n_bootstrap": cfg.n_bootstrap, "aea_aggregation": cfg.aea_aggregation,
                     "wsa_classifier": cfg.wsa_classifier, "wsa_lambda": cfg.wsa_lambda,
                     "calibration_fraction": cfg.calibration_fraction,
                     "augment": cache.augment.__dict__},
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return AuditResult(metrics, scores, labels, [r.key for r in records], notes, embedded,
                       pseudo_keys, provenance, feats["evaluation"])


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
