"""Command line: `mmia embed`, `mmia audit`, `mmia pilot`.

The one module that parses arguments and prints; every command is a Python API underneath
(`mmia.embed.embed_shards`, `mmia.audit.run_audit`, `mmia.pilot.run_pilot`) that returns a
result. Every user error becomes one line on stderr naming the problem and the fix, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from mmia.errors import MmiaError

DEFAULT_ATTACKS = "csa,aea,wsa,blind"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="open_clip model name, e.g. ViT-B-32")
    p.add_argument("--pretrained", help="pretrained tag (e.g. openai) or local checkpoint path")
    p.add_argument("--model-config", help="custom open_clip model-config JSON file")
    p.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="build with QuickGELU (required choice for local weights of "
                        "architectures whose released tags used it, e.g. ViT-B-32 openai)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="fp32", help="fp32 (default), fp16, bf16, amp")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 1)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_embed_parser(sub) -> None:
    p = sub.add_parser("embed", help="fill the embedding cache from shards")
    add_model_args(p)
    p.add_argument("--shards", nargs="+", action="extend", required=True,
                   help="webdataset URL patterns (brace expansion; may repeat)")
    p.add_argument("--cache", required=True, help="embedding cache folder")
    p.add_argument("--views", type=int, default=0, help="augmented views per image for AEA")
    p.set_defaults(func=cli_embed)


def add_audit_parser(sub) -> None:
    from mmia.attacks import ATTACKS
    from mmia.attacks.aea import AGGREGATIONS, DEFAULT_AGGREGATION
    from mmia.audit import ROLES

    p = sub.add_parser("audit", help="run membership-inference attacks and write a report")
    add_model_args(p)
    for role in ROLES:
        p.add_argument("--" + role.replace("_", "-"), dest=role, nargs="+", action="extend",
                       required=role in ("members", "nonmembers"),
                       help=f"shard patterns of the {role.replace('_', ' ')} (may repeat)")
    p.add_argument("--attacks", default=DEFAULT_ATTACKS, help=f"from {','.join(ATTACKS)}")
    p.add_argument("--cache", default=".mmia/cache")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--views", type=int, default=10, help="augmented views for AEA (K)")
    p.add_argument("--aea-aggregation", default=DEFAULT_AGGREGATION, choices=AGGREGATIONS,
                   help=f"how AEA combines its views (default {DEFAULT_AGGREGATION}; README)")
    p.add_argument("--wsa-lambda", type=float, default=1.5,
                   help="pseudo-member threshold μ + λσ of known non-members' CSA (paper: 1.5)")
    p.add_argument("--wsa-classifier", default="mlp", choices=["mlp", "logreg"])
    p.add_argument("--calibration-fraction", type=float, default=0.5,
                   help="share of the known non-members held out of WSA's training to set "
                        "its threshold (default 0.5)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.set_defaults(func=cli_audit)


def add_pilot_parser(sub) -> None:
    from mmia.pilot import PILOT_WSA_LAMBDA
    from mmia.world import TrainConfig, WorldConfig

    world, train = WorldConfig(), TrainConfig()
    p = sub.add_parser("pilot", help="run the default study on the synthetic pilot world")
    p.add_argument("--root", default=".mmia/pilot", help="where the world, models, cache live")
    p.add_argument("--out", default="mmia-out/pilot")
    p.add_argument("--attacks", default=DEFAULT_ATTACKS)
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="attack and bootstrap seed")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--wsa-lambda", type=float, default=PILOT_WSA_LAMBDA,
                   help="pseudo-member threshold μ + λσ (default 0.5 here: the known non-members' "
                        "cosines are skewed and at the paper's 1.5 μ + λσ exceeds 1)")
    g = p.add_argument_group("world and target (a new combination builds a new world)")
    g.add_argument("--world-seed", type=int, default=world.seed,
                   help="seed of the world and of the target's training")
    g.add_argument("--members", type=int, default=world.n_members,
                   help="target training-set size")
    g.add_argument("--epochs", type=int, default=train.epochs)
    g.add_argument("--idio-strength", type=float, default=world.idio_strength,
                   help="weight of each image's memorisable texture (0 = none)")
    g.add_argument("--model-config", help="open_clip model-config JSON of the target "
                   "(default: the embedded mmia-tiny-vit)")
    g.add_argument("--shift-strength", type=float, default=world.shift_strength,
                   help="post-release shift: share of attributes from a new vocabulary")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cli_pilot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmia", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_embed_parser(sub)
    add_audit_parser(sub)
    add_pilot_parser(sub)
    return parser


def ensure_writable_dir(path: str, flag: str) -> None:
    """Create a folder the run will write to, or fail with one line naming the flag."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise MmiaError(f"cannot create {flag.lstrip('-')} folder {path!r} ({exc.strerror}): "
                        f"pass a writable {flag}") from None
    if not os.access(path, os.W_OK):
        raise MmiaError(f"{flag.lstrip('-')} folder {path!r} is not writable: "
                        f"pass a writable {flag}")


def _load(args: argparse.Namespace):
    from mmia.model import load_model

    loaded = load_model(args.model, args.pretrained, args.model_config, args.device,
                        args.precision, quick_gelu=args.quick_gelu)
    logging.getLogger("mmia").info("model %s fingerprint %s on %s", loaded.name,
                                   loaded.fingerprint, loaded.device)
    return loaded


def cli_embed(args: argparse.Namespace) -> int:
    from mmia.embed import embed_shards
    from mmia.shards import expand_patterns

    expand_patterns(args.shards)  # fail on bad patterns before loading a model
    if args.views < 0 or args.batch_size < 1:
        raise MmiaError("--views must be ≥ 0 and --batch-size ≥ 1")
    ensure_writable_dir(args.cache, "--cache")
    result = embed_shards(_load(args), args.shards, args.cache, views=args.views,
                          batch_size=args.batch_size, workers=args.workers,
                          progress=not args.no_progress)
    print(result.summary())
    return 0


def cli_audit(args: argparse.Namespace) -> int:
    from mmia.audit import ROLES, AuditConfig, format_table, parse_attacks, run_audit
    from mmia.report import console_notes
    from mmia.shards import expand_patterns

    if not 0 < args.calibration_fraction < 1:
        raise MmiaError("--calibration-fraction must be between 0 and 1")
    cfg = AuditConfig(
        members=args.members, nonmembers=args.nonmembers,
        known_nonmembers=args.known_nonmembers or [], pool=args.pool or [],
        attacks=parse_attacks(args.attacks), cache=args.cache, out=args.out, views=args.views,
        seed=args.seed, n_bootstrap=args.bootstrap, batch_size=args.batch_size,
        workers=args.workers, aea_aggregation=args.aea_aggregation,
        wsa_classifier=args.wsa_classifier, wsa_lambda=args.wsa_lambda,
        calibration_fraction=args.calibration_fraction, progress=not args.no_progress)
    for role in ROLES:
        if getattr(cfg, role):
            expand_patterns(getattr(cfg, role))
    ensure_writable_dir(cfg.out, "--out")
    ensure_writable_dir(cfg.cache, "--cache")
    result = run_audit(_load(args), cfg, args.command_line)
    for note in result.notes:
        print(note, file=sys.stderr)
    result.write(cfg.out)
    print(format_table([("audit", n, m) for n, m in result.metrics.items()]))
    for line in console_notes(result.metrics):
        print(line)
    print(f"wrote metrics.json, scores.csv, roc.png, report.html to {cfg.out}")
    return 0


def cli_pilot(args: argparse.Namespace) -> int:
    from mmia.audit import parse_attacks
    from mmia.pilot import PilotSettings, pilot_configs, run_pilot

    settings = PilotSettings(attacks=parse_attacks(args.attacks), views=args.views,
                             seed=args.seed, n_bootstrap=args.bootstrap,
                             wsa_lambda=args.wsa_lambda, progress=not args.no_progress)
    world_cfg, train_cfg = pilot_configs(args.members, args.epochs, args.world_seed,
                                         args.idio_strength, args.shift_strength)
    if args.model_config and not os.path.isfile(args.model_config):
        raise MmiaError(f"model config {args.model_config!r} does not exist: pass a JSON file")
    ensure_writable_dir(args.out, "--out")
    result = run_pilot(args.root, args.out, settings, world_cfg, train_cfg, args.model_config)
    result.write(args.out, args.command_line)
    print(result.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _log_to_stderr()
    try:  # building the parser imports the attacks: a broken install must be named, too
        args = build_parser().parse_args(argv)
        args.command_line = "mmia " + " ".join(shlex.quote(a) for a in argv)  # for provenance
        return args.func(args)
    except MmiaError as exc:
        print(f"mmia: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmia: interrupted (the cache keeps every committed segment; rerun to resume)",
              file=sys.stderr)
        return 130
    except ImportError as exc:  # a broken install: say which module, never hide the command
        print(f"mmia: error: cannot import {exc.name or 'a dependency'} ({exc}): the "
              "installation is broken; reinstall mmia and its dependencies", file=sys.stderr)
        return 1
    except PermissionError as exc:
        print(f"mmia: error: no permission to write {exc.filename!r}: choose a writable folder",
              file=sys.stderr)
        return 2


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _log_to_stderr() -> None:
    """mmia's INFO messages (what is being embedded, skip counts) as plain lines on stderr."""
    logger = logging.getLogger("mmia")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a root handler (open_clip's logging.warning adds one) repeats
