"""`mmia audit`: embed what the cache lacks, run the attacks, evaluate honestly, write reports.

Thresholds come from known non-members only; the blind baseline runs beside the attacks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from mmia.attacks import ATTACKS, Features, make_attack
from mmia.attacks.aea import AGGREGATIONS, DEFAULT_AGGREGATION
from mmia.cache import EmbeddingCache
from mmia.embed import EmbedResult, SampleRecord, embed_shards
from mmia.errors import MmiaError
from mmia.metrics import evaluate
from mmia.model import LoadedModel, load_model
from mmia.report import console_notes, write_outputs
from mmia.shards import expand_patterns

ROLES = ("members", "nonmembers", "known_nonmembers", "pool")


@dataclass
class AuditConfig:
    """Everything an audit needs besides the model."""

    members: list[str]
    nonmembers: list[str]
    known_nonmembers: list[str] = field(default_factory=list)
    pool: list[str] = field(default_factory=list)
    attacks: tuple[str, ...] = ("csa", "aea", "wsa", "blind")
    cache: str = ".mmia/cache"
    out: str = "mmia-out"
    views: int = 10
    seed: int = 0
    target_fpr: float = 0.01
    n_bootstrap: int = 1000
    batch_size: int = 32
    workers: int | None = None
    aea_aggregation: str = DEFAULT_AGGREGATION
    wsa_classifier: str = "mlp"
    wsa_lambda: float = 1.5
    progress: bool = True


@dataclass
class AuditResult:
    metrics: dict
    scores: dict[str, np.ndarray]
    labels: np.ndarray
    keys: list[str]
    notes: list[str]
    embed: dict[str, EmbedResult]
    wsa_pseudo_member_keys: list[str] = field(default_factory=list)


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
    )


def check_disjoint(members: list[SampleRecord], nonmembers: list[SampleRecord]) -> None:
    keys = {r.key for r in members} & {r.key for r in nonmembers}
    if keys:
        raise MmiaError(
            f"{len(keys)} key(s) are both members and non-members (e.g. {sorted(keys)[0]!r}): "
            "a sample cannot be both; remove the shared shards from one of the sets"
        )
    pairs = {(r.image_digest, r.caption_digest) for r in members}
    same = [r.key for r in nonmembers if (r.image_digest, r.caption_digest) in pairs]
    if same:
        raise MmiaError(
            f"{len(same)} non-member(s) have the same image and caption as a member "
            f"(e.g. {same[0]!r}): de-duplicate the sets before auditing"
        )


def run_attack(name: str, cfg: AuditConfig, feats: dict[str, Features | None],
               labels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, object]:
    """(evaluation scores, known-non-member scores or None, fitted attack)."""
    params = {"aea": {"aggregation": cfg.aea_aggregation},
              "wsa": {"classifier": cfg.wsa_classifier, "lam": cfg.wsa_lambda,
                      "seed": cfg.seed}}.get(name, {})
    attack = make_attack(name, **params)
    evaluation = feats["evaluation"]
    if "labels" in attack.requires:  # the blind baseline: cross-validated on evaluation labels
        return attack.cross_val_scores(evaluation, labels, seed=cfg.seed), None, attack
    attack.fit(known_nonmembers=feats["known_nonmembers"], pool=feats["pool"])
    known = feats["known_nonmembers"]
    known_scores = attack.score(known) if known is not None and len(known) else None
    return attack.score(evaluation), known_scores, attack


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


def run_audit(loaded: LoadedModel, cfg: AuditConfig, command: str = "") -> AuditResult:
    """Embed every role, run the attacks, evaluate and write the four outputs."""
    roles = {r: getattr(cfg, r) for r in ROLES}
    all_urls = [u for p in roles.values() if p for u in expand_patterns(p)]
    os.makedirs(cfg.out, exist_ok=True)
    if not os.access(cfg.out, os.W_OK):
        raise MmiaError(f"output folder {cfg.out!r} is not writable: pass another --out")
    views = cfg.views if "aea" in cfg.attacks else 0
    keep = "blind" in cfg.attacks
    embedded: dict[str, EmbedResult] = {}
    for role, patterns in roles.items():
        if patterns:
            print(f"embedding {role} …", file=sys.stderr)
            embedded[role] = embed_shards(
                loaded, patterns, cfg.cache, views=views, batch_size=cfg.batch_size,
                workers=cfg.workers, progress=cfg.progress, keep_images=keep,
                label_urls=all_urls)
            print(f"{role}: " + embedded[role].summary().replace("\n", f"\n{role}: "),
                  file=sys.stderr)
    members, nonmembers = embedded["members"].records, embedded["nonmembers"].records
    if not members or not nonmembers:
        which = "members" if not members else "non-members"
        raise MmiaError(f"no usable {which} in the evaluation set: check the shard patterns "
                        "and the skip counts above")
    check_disjoint(members, nonmembers)
    cache = EmbeddingCache(cfg.cache, loaded.fingerprint)
    records = members + nonmembers
    labels = np.array([1] * len(members) + [0] * len(nonmembers))
    feats: dict[str, Features | None] = {"evaluation": features_of(records, cache, views)}
    for role in ("known_nonmembers", "pool"):
        recs = embedded[role].records if role in embedded else []
        feats[role] = features_of(recs, cache, views) if recs else None
    have = {"known_nonmembers": feats["known_nonmembers"] is not None,
            "pool": feats["pool"] is not None, "views": views > 0}
    notes: list[str] = []
    skipped = skipped_attacks(cfg, have)
    for name, why in skipped.items():
        notes.append(f"attack {name} skipped: it {why}")
    metrics: dict[str, dict] = {}
    scores: dict[str, np.ndarray] = {}
    pseudo_keys: list[str] = []
    for name in cfg.attacks:
        if name in skipped:
            continue
        try:
            s, known_scores, attack = run_attack(name, cfg, feats, labels)
        except MmiaError as exc:
            notes.append(f"attack {name} skipped: {exc}")
            continue
        scores[name] = s
        metrics[name] = evaluate(labels, s, known_scores, target_fpr=cfg.target_fpr,
                                 n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
        if name == "wsa":
            metrics[name]["n_pseudo_members"] = int(attack.n_pseudo_members_)
            metrics[name]["wsa_threshold"] = float(attack.threshold_)
            metrics[name]["wsa_known_csa_mean"] = attack.mu_
            metrics[name]["wsa_known_csa_std"] = attack.sigma_
            pool = feats["pool"]
            pseudo_keys = [pool.keys[i] for i in attack.pseudo_member_idx_]
    skips = {role: dict(r.skips) for role, r in embedded.items()}
    provenance = {
        "model": {**loaded.description, "fingerprint": loaded.fingerprint},
        "data": {role: {"patterns": p, "samples": len(embedded[role].records),
                        "skipped": skips[role], "warnings": dict(embedded[role].warnings)}
                 for role, p in roles.items() if p},
        "skipped": {role: sum(c.values()) for role, c in skips.items()},
        "notes": notes,
        "settings": {"seed": cfg.seed, "views": views, "target_fpr": cfg.target_fpr,
                     "n_bootstrap": cfg.n_bootstrap, "aea_aggregation": cfg.aea_aggregation,
                     "wsa_classifier": cfg.wsa_classifier, "wsa_lambda": cfg.wsa_lambda,
                     "augment": cache.augment.__dict__},
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if not scores:
        raise MmiaError("no attack could run: " + "; ".join(notes))
    write_outputs(cfg.out, metrics, scores, labels, [r.key for r in records], provenance,
                  samples=feats["evaluation"])
    return AuditResult(metrics, scores, labels, [r.key for r in records], notes, embedded,
                       pseudo_keys)


def format_table(rows: list[tuple[str, str, dict]]) -> str:
    """Markdown table: attack × protocol × AUC, TPR@1%, TPR@0.1% with 95 % intervals."""

    def cell(m: dict, k: str) -> str:
        lo, hi = m.get("ci95", {}).get(k, (float("nan"), float("nan")))
        return f"{m[k]:.3f} [{lo:.3f}, {hi:.3f}]"

    lines = ["| protocol | attack | AUC | TPR@1%FPR | TPR@0.1%FPR | achieved FPR |",
             "|---|---|---|---|---|---|"]
    for protocol, name, m in rows:
        lines.append(f"| {protocol} | {name} | {cell(m, 'auc')} | {cell(m, 'tpr@1%fpr')} | "
                     f"{cell(m, 'tpr@0.1%fpr')} | {m.get('achieved_fpr', float('nan')):.3f} |")
    return "\n".join(lines)


def add_audit_parsers(sub) -> None:
    from mmia.cli import add_model_args

    p = sub.add_parser("audit", help="run membership-inference attacks and write a report")
    add_model_args(p)
    for role in ROLES:
        flag = "--" + role.replace("_", "-")
        p.add_argument(flag, dest=role, nargs="+", action="extend",
                       required=role in ("members", "nonmembers"),
                       help=f"shard patterns of the {role.replace('_', ' ')} (may repeat)")
    p.add_argument("--attacks", default="csa,aea,wsa,blind")
    p.add_argument("--cache", default=".mmia/cache")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--views", type=int, default=10, help="augmented views for AEA (K)")
    p.add_argument("--aea-aggregation", default=DEFAULT_AGGREGATION, choices=AGGREGATIONS,
                   help=f"how AEA combines its views (default {DEFAULT_AGGREGATION}; README)")
    p.add_argument("--wsa-lambda", type=float, default=1.5,
                   help="pseudo-member threshold μ + λσ of known non-members' CSA (paper: 1.5)")
    p.add_argument("--wsa-classifier", default="mlp", choices=["mlp", "logreg"])
    p.add_argument("--bootstrap", type=int, default=1000)
    p.set_defaults(func=cli_audit)

    try:
        from mmia.pilot import add_pilot_parser
    except ImportError:
        return
    add_pilot_parser(sub)


def cli_audit(args: argparse.Namespace) -> int:
    cfg = AuditConfig(
        members=args.members, nonmembers=args.nonmembers,
        known_nonmembers=args.known_nonmembers or [], pool=args.pool or [],
        attacks=parse_attacks(args.attacks), cache=args.cache, out=args.out, views=args.views,
        seed=args.seed, n_bootstrap=args.bootstrap, batch_size=args.batch_size,
        workers=args.workers, aea_aggregation=args.aea_aggregation,
        wsa_classifier=args.wsa_classifier, wsa_lambda=args.wsa_lambda,
        progress=not args.no_progress)
    for role in ROLES:
        if getattr(cfg, role):
            expand_patterns(getattr(cfg, role))
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as exc:
        raise MmiaError(f"cannot create output folder {cfg.out!r} ({exc.strerror}): "
                        "pass a writable --out") from None
    from mmia.cli import ensure_writable_dir

    ensure_writable_dir(cfg.cache, "--cache")
    loaded = load_model(args.model, args.pretrained, args.model_config, args.device,
                        args.precision)
    result = run_audit(loaded, cfg, args.command_line)
    for note in result.notes:
        print(note, file=sys.stderr)
    print(format_table([("audit", n, m) for n, m in result.metrics.items()]))
    for line in console_notes(result.metrics):
        print(line)
    print(f"wrote metrics.json, scores.csv, roc.png, report.html to {cfg.out}")
    return 0
