"""Command line: `mmia embed`, `audit`, `infer`, `pilot`, `cache verify`, `data` (sets, downloads).

`mmia data sample|dedup|after|pool|download` (mmia/data/cli.py) builds audit sets from metadata.

The one module that parses arguments and prints; every command is a Python API underneath
(`mmia.embed.embed_shards`, `mmia.audit.run_audit`, `mmia.infer.run_inference`,
`mmia.pilot.run_pilot`) that returns a result. Every user error becomes one line on stderr
naming the problem and the fix, exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import shlex
import signal
import sys
from collections.abc import Iterator

from mmia.checks import WSA_AUTO, check_embed_settings, integer, wsa_lambda
from mmia.data.cli import add_data_parser
from mmia.errors import MmiaError

DEFAULT_ATTACKS = "csa,aea,wsa,blind"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="open_clip model name, e.g. ViT-B-32")
    p.add_argument("--pretrained", help="pretrained tag (e.g. openai) or local checkpoint path")
    p.add_argument("--model-config", help="custom open_clip model-config JSON file")
    p.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="build with QuickGELU (required choice for local weights of "
                        "architectures whose released tags used it, e.g. ViT-B-32 openai)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="fp32", help="fp32 (default), fp16, bf16, amp")
    p.add_argument("--batch-size", type=integer, default=32)
    p.add_argument("--workers", type=integer, default=None,
                   help="DataLoader workers (default 1)")
    p.add_argument("--threads", type=integer, default=None,
                   help="torch CPU threads (default: OMP_NUM_THREADS, else the cores; lower "
                        "it on a machine busy with other work)")
    p.add_argument("--keep-view-features", action="store_true",
                   help="also cache each augmented view's features (AEA needs only their "
                        "cosines, which are always cached; views × 2 KB per image at d=512)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_embed_parser(sub) -> None:
    p = sub.add_parser("embed", help="fill the embedding cache from shards")
    add_model_args(p)
    p.add_argument("--shards", nargs="+", action="extend", required=True,
                   help="webdataset URL patterns (brace expansion; may repeat)")
    p.add_argument("--cache", required=True, help="embedding cache folder")
    p.add_argument("--views", type=integer, default=0,
                   help="augmented views per image for AEA")
    p.set_defaults(func=cli_embed)


def add_wsa_args(p: argparse.ArgumentParser, default_lambda: float | str = WSA_AUTO) -> None:
    """--wsa-lambda and --wsa-features, shared by audit, pilot and infer."""
    from mmia.attacks.wsa import FEATURE_SETS, MIN_PSEUDO_MEMBERS

    p.add_argument("--wsa-lambda", type=wsa_lambda, default=default_lambda,
                   help="pseudo-member threshold μ + λσ of known non-members' CSA: a number, "
                        "or auto (default): the paper's 1.5 if it selects at least "
                        f"{MIN_PSEUDO_MEMBERS} pool samples, else the largest λ of Ko et "
                        "al.'s grid 0.5, 0, -0.5, -1.5, -2.5 that does")
    p.add_argument("--wsa-features", default="concat", choices=FEATURE_SETS,
                   help="WSA classifier input: concat = [image ‖ text] (paper, default), "
                        "concat_cos = [image ‖ text ‖ cosine] (Gomez)")


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
    p.add_argument("--seed", type=integer, default=0, help="from 0 to 2**32 - 1")
    p.add_argument("--views", type=integer, default=10, help="augmented views for AEA (K)")
    p.add_argument("--aea-aggregation", default=DEFAULT_AGGREGATION, choices=AGGREGATIONS,
                   help=f"how AEA combines its views (default {DEFAULT_AGGREGATION}; README)")
    add_wsa_args(p)
    p.add_argument("--wsa-classifier", default="mlp", choices=["mlp", "logreg"])
    p.add_argument("--calibration-fraction", type=float, default=0.5,
                   help="share of the known non-members held out of WSA's training to set "
                        "its threshold (default 0.5)")
    p.add_argument("--bootstrap", type=integer, default=1000)
    add_reference_args(p)
    p.set_defaults(func=cli_audit)


def add_reference_args(p: argparse.ArgumentParser) -> None:
    """rcsa's reference models: --reference (repeatable), their architecture, calibration."""
    from mmia.attacks.rcsa import CALIBRATIONS, DEFAULT_CALIBRATION

    g = p.add_argument_group("reference models (attack rcsa)")
    g.add_argument("--reference", dest="references", action="append", default=[],
                   metavar="CKPT", help="a reference model's weights (checkpoint file or "
                   "pretrained tag): a model that did not train on the evaluation samples; "
                   "repeat for several. Same architecture and config as the target unless "
                   "--reference-model says otherwise")
    g.add_argument("--reference-model", help="the references' open_clip model name "
                   "(default: the target's --model and --model-config)")
    g.add_argument("--reference-config", help="the references' model-config JSON file")
    g.add_argument("--rcsa-calibration", default=DEFAULT_CALIBRATION, choices=CALIBRATIONS,
                   help="offset (default): the target's Fisher-z cosine minus the "
                   "references' mean; regress: its residual on theirs over known non-members "
                   "(calibrated on the others); z: LiRA-offline z-score (≥ 2 references)")
    add_mcd_args(p)


def add_mcd_args(p: argparse.ArgumentParser) -> None:
    """The MC-dropout attack's passes, dropout and statistic (audit and pilot)."""
    from mmia.attacks.mcd import DEFAULT_STATISTIC, STATISTICS
    from mmia.variants import MCD_DROPOUT, MCD_PASSES

    g = p.add_argument_group("MC dropout (attack mcd)")
    g.add_argument("--mcd-passes", type=integer, default=MCD_PASSES,
                   help=f"stochastic forward passes (default {MCD_PASSES})")
    g.add_argument("--mcd-dropout", type=float, default=MCD_DROPOUT,
                   help=f"dropout on the attention weights (default {MCD_DROPOUT})")
    g.add_argument("--mcd-statistic", default=DEFAULT_STATISTIC, choices=STATISTICS,
                   help="what of the passes' cosines is the score (default "
                   f"{DEFAULT_STATISTIC})")


def reference_requests(args: argparse.Namespace) -> tuple:
    """The --reference models as load requests, on the target's device and precision."""
    from mmia.modelref import CHECKPOINT_SUFFIXES, ModelRequest

    own = args.reference_model is None  # the target's architecture and config
    config = args.reference_config or (args.model_config if own else None)
    if config and not os.path.isfile(config):
        raise MmiaError(f"reference model config {config!r} does not exist: pass a JSON file")
    for weights in args.references:
        if (os.sep in weights or weights.endswith(CHECKPOINT_SUFFIXES)) \
                and not os.path.isfile(weights):
            raise MmiaError(f"reference checkpoint {weights!r} does not exist")
    return tuple(ModelRequest(args.model if own else args.reference_model, weights, config,
                              args.device, args.precision, args.quick_gelu if own else None)
                 for weights in args.references)


def add_pilot_parser(sub) -> None:
    from mmia.attacks.rcsa import CALIBRATIONS, DEFAULT_CALIBRATION
    from mmia.pilot import PILOT_ATTACKS, PILOT_REFERENCES, PILOT_WSA_LAMBDA
    from mmia.world.synthetic import WorldConfig

    world = WorldConfig()
    p = sub.add_parser("pilot", help="run the default study on the synthetic pilot world")
    p.add_argument("--root", default=".mmia/pilot", help="where the world, models, cache live")
    p.add_argument("--out", default="mmia-out/pilot")
    p.add_argument("--attacks", default=",".join(PILOT_ATTACKS))
    p.add_argument("--views", type=integer, default=10)
    p.add_argument("--seed", type=integer, default=0, help="attack and bootstrap seed")
    p.add_argument("--references", type=integer, default=PILOT_REFERENCES,
                   help="reference models for rcsa, each trained on its own random half of "
                   f"the world's reference split (default {PILOT_REFERENCES})")
    p.add_argument("--rcsa-calibration", default=DEFAULT_CALIBRATION, choices=CALIBRATIONS)
    add_mcd_args(p)
    p.add_argument("--bootstrap", type=integer, default=1000)
    add_wsa_args(p, PILOT_WSA_LAMBDA)
    g = p.add_argument_group("world and target (a new combination builds a new world)")
    g.add_argument("--world-seed", type=integer, default=world.seed,
                   help="seed of the world and of the target's training")
    g.add_argument("--members", type=integer, default=world.n_members,
                   help="target training-set size")
    g.add_argument("--epochs", type=integer, default=None,
                   help="training epochs of the target (default 15)")
    g.add_argument("--idio-strength", type=float, default=world.idio_strength,
                   help="weight of each image's memorisable texture (0 = none)")
    g.add_argument("--model-config", help="open_clip model-config JSON of the target "
                   "(default: the embedded mmia-tiny-vit)")
    g.add_argument("--shift-strength", type=float, default=world.shift_strength,
                   help="post-release shift: share of attributes from a new vocabulary")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cli_pilot)


def add_cache_parser(sub) -> None:
    from mmia.cache import COMPACT_AFTER

    p = sub.add_parser("cache", help="inspect an embedding cache")
    actions = p.add_subparsers(dest="action", required=True)
    verify = actions.add_parser("verify", help="check every segment; quarantine bad ones "
                                "(exit 1 when any was bad: its samples are embedded again)")
    verify.add_argument("--cache", required=True, help="embedding cache folder")
    verify.set_defaults(func=cli_cache_verify)
    info = actions.add_parser("info", help="stores, segments, rows and bytes (reads no data)")
    info.add_argument("--cache", required=True, help="embedding cache folder")
    info.set_defaults(func=cli_cache_info)
    compact = actions.add_parser("compact", help="merge small segments (crash-safe; embed "
                                 f"runs do it once a store has {COMPACT_AFTER} small ones)")
    compact.add_argument("--cache", required=True, help="embedding cache folder")
    compact.set_defaults(func=cli_cache_compact)


def add_infer_parser(sub) -> None:
    from mmia.attacks.aea import AGGREGATIONS, DEFAULT_AGGREGATION
    from mmia.attacks.wsa import CLASSIFIERS
    from mmia.infer import INFER_ATTACKS

    p = sub.add_parser("infer", help="was this data used to train the model? p-values and a "
                       "verdict for unlabeled candidates")
    add_model_args(p)
    for role, what in (("candidates", "the samples whose membership is unknown"),
                       ("known_nonmembers", "data the model cannot have seen (the null)"),
                       ("pool", "unlabeled data for WSA")):
        p.add_argument("--" + role.replace("_", "-"), dest=role, nargs="+", action="extend",
                       help=f"shard patterns of {what} (may repeat)")
    p.add_argument("--attacks", default=",".join(INFER_ATTACKS),
                   help=f"from {','.join(INFER_ATTACKS)}")
    p.add_argument("--target-fpr", type=float, default=0.01,
                   help="flag candidates whose p-value is at most this (default 0.01)")
    p.add_argument("--alpha", type=float, default=0.05,
                   help="level of the dataset-level test (default 0.05; the members' lower "
                        "bound is a 95 %% bound whatever this is)")
    p.add_argument("--cache", default=".mmia/cache")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=integer, default=0, help="from 0 to 2**32 - 1")
    p.add_argument("--views", type=integer, default=10, help="augmented views for AEA (K)")
    p.add_argument("--aea-aggregation", default=DEFAULT_AGGREGATION, choices=AGGREGATIONS)
    add_wsa_args(p)
    p.add_argument("--wsa-classifier", default="mlp", choices=CLASSIFIERS)
    p.add_argument("--calibration-fraction", type=float, default=0.5,
                   help="share of the known non-members held out of WSA's training; its "
                        "p-values come from them (default 0.5)")
    p.set_defaults(func=cli_infer)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmia", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_embed_parser(sub)
    add_audit_parser(sub)
    add_pilot_parser(sub)
    add_cache_parser(sub)
    add_infer_parser(sub)
    add_data_parser(sub)
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


def ensure_cache_dir(path: str) -> None:
    """Create the cache folder if needed; an existing read-only cache may serve what it
    holds (embedding refuses, before any forward pass, when something is missing)."""
    if os.path.isdir(path):
        return
    ensure_writable_dir(path, "--cache")


def check_run_inputs(device: str, cfg, roles) -> None:
    """Before a model is loaded: the device exists, every role's patterns name shards, and
    the output and cache folders can be used."""
    from mmia.shards import expand_patterns

    check_device(device)
    for role in roles:
        if getattr(cfg, role):
            expand_patterns(getattr(cfg, role))
    ensure_writable_dir(cfg.out, "--out")
    ensure_cache_dir(cfg.cache)


def check_device(device: str) -> None:
    """Refuse a --device mmia cannot embed on before any shard is read (torch is imported only
    for devices other than auto and cpu)."""
    if device in ("auto", "cpu"):
        return
    from mmia.model import resolve_device

    resolve_device(device)


def _load(args: argparse.Namespace):
    """The model, built only when something must be embedded (`mmia.modelref.LazyModel`)."""
    from mmia.modelref import LazyModel, ModelRequest

    request = ModelRequest(args.model, args.pretrained, args.model_config, args.device,
                           args.precision, args.quick_gelu)
    return LazyModel(request, getattr(args, "cache", None))


def cli_embed(args: argparse.Namespace) -> int:
    from mmia.distributed import embed_in_shares, is_main, setup_rank
    from mmia.embed import embed_shards
    from mmia.shards import expand_patterns

    check_embed_settings(args.views, args.batch_size, args.workers, args.threads)
    check_device(args.device)
    expand_patterns(args.shards)  # fail on bad patterns before loading a model
    ensure_cache_dir(args.cache)
    args.device = setup_rank(args.device)  # under torchrun: this rank's GPU; else as given
    loaded = _load(args)
    result = embed_in_shares(lambda share: embed_shards(
        loaded, args.shards, args.cache, views=args.views, batch_size=args.batch_size,
        workers=args.workers, progress=not args.no_progress and is_main(), shard_share=share,
        keep_view_features=args.keep_view_features, threads=args.threads))
    if result is not None:  # None: a torchrun rank other than 0 (rank 0 reports the sum)
        print(result.summary())
    return 0


def run_config(args: argparse.Namespace, cfg, roles, run):
    """What `audit` and `infer` share after their config: check the inputs, embed (every
    torchrun rank its share), then on rank 0 (or alone) `run(model, cfg, command)`, print its
    notes and write its outputs; the result, or None on the other ranks."""
    from mmia.distributed import embed_config_in_shares, setup_rank

    check_run_inputs(args.device, cfg, roles)
    args.device = setup_rank(args.device)  # under torchrun: this rank's GPU; else as given
    loaded = _load(args)
    if not embed_config_in_shares(loaded, cfg):  # torchrun: every rank embeds its share
        return None  # rank 0 alone runs the attacks and writes the outputs
    result = run(loaded, cfg, args.command_line)
    for note in result.notes:
        print(note, file=sys.stderr)
    result.write(cfg.out)
    return result


def cli_audit(args: argparse.Namespace) -> int:
    from mmia.audit import ROLES, AuditConfig, format_table, parse_attacks, run_audit
    from mmia.report import console_notes

    cfg = AuditConfig(  # validates every setting: one line before any work
        members=args.members, nonmembers=args.nonmembers,
        known_nonmembers=args.known_nonmembers or [], pool=args.pool or [],
        attacks=parse_attacks(args.attacks), cache=args.cache, out=args.out, views=args.views,
        seed=args.seed, n_bootstrap=args.bootstrap, batch_size=args.batch_size,
        workers=args.workers, aea_aggregation=args.aea_aggregation,
        wsa_classifier=args.wsa_classifier, wsa_lambda=args.wsa_lambda,
        wsa_features=args.wsa_features,
        calibration_fraction=args.calibration_fraction, progress=not args.no_progress,
        keep_view_features=args.keep_view_features, threads=args.threads,
        references=reference_requests(args), rcsa_calibration=args.rcsa_calibration,
        mcd_passes=args.mcd_passes, mcd_dropout=args.mcd_dropout,
        mcd_statistic=args.mcd_statistic)
    result = run_config(args, cfg, ROLES, run_audit)
    if result is None:
        return 0
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
                             wsa_lambda=args.wsa_lambda, wsa_features=args.wsa_features,
                             progress=not args.no_progress, references=args.references,
                             rcsa_calibration=args.rcsa_calibration,
                             mcd_passes=args.mcd_passes, mcd_dropout=args.mcd_dropout,
                             mcd_statistic=args.mcd_statistic)
    world_cfg, train_cfg = pilot_configs(args.members, args.epochs, args.world_seed,
                                         args.idio_strength, args.shift_strength)
    if args.model_config and not os.path.isfile(args.model_config):
        raise MmiaError(f"model config {args.model_config!r} does not exist: pass a JSON file")
    ensure_writable_dir(args.out, "--out")
    result = run_pilot(args.root, args.out, settings, world_cfg, train_cfg, args.model_config)
    result.write(args.out, args.command_line)
    print(result.text)
    return 0


def cli_infer(args: argparse.Namespace) -> int:
    from mmia.infer import OUTPUTS, ROLES, InferConfig, console_lines, parse_attacks, run_inference

    cfg = InferConfig(  # validates every setting: one line before any work
        candidates=args.candidates or [], known_nonmembers=args.known_nonmembers or [],
        pool=args.pool or [], attacks=parse_attacks(args.attacks), cache=args.cache,
        out=args.out, views=args.views, seed=args.seed, target_fpr=args.target_fpr,
        alpha=args.alpha, batch_size=args.batch_size, workers=args.workers,
        aea_aggregation=args.aea_aggregation, wsa_classifier=args.wsa_classifier,
        wsa_lambda=args.wsa_lambda, wsa_features=args.wsa_features,
        calibration_fraction=args.calibration_fraction,
        progress=not args.no_progress, keep_view_features=args.keep_view_features,
        threads=args.threads)
    result = run_config(args, cfg, ROLES, run_inference)
    if result is None:
        return 0
    print("\n".join(console_lines(result)))
    print(f"wrote {', '.join(OUTPUTS)} to {cfg.out}")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it takes Ctrl-C's clean path (DataLoader
    workers shut down, partial outputs left aside)."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises `Terminated` in this process; a second one kills at once.

    Forked DataLoader workers inherit the handler: in them SIGTERM keeps its default action.
    """
    main_pid = os.getpid()

    def on_sigterm(signum: int, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if os.getpid() != main_pid:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


OS_ERROR_HINTS = {
    errno.ENOSPC: "free some space or choose another --cache/--out, then rerun",
    errno.EDQUOT: "free some space or choose another --cache/--out, then rerun",
    errno.EROFS: "choose a writable folder",
    errno.EACCES: "choose a folder you may write to",
    errno.EPERM: "choose a folder you may write to",
    errno.EMFILE: "raise the open-file limit (ulimit -n) or pass fewer --workers/--views",
    errno.ENFILE: "raise the open-file limit (ulimit -n) or pass fewer --workers/--views",
}
USER_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)  # a folder the user chose: exit 2


def os_error_line(exc: OSError) -> str:
    """One line for an OSError that no module turned into an MmiaError."""
    if exc.strerror:
        where = f" on {str(exc.filename)!r}" if exc.filename is not None else ""
        text = exc.strerror + where
    else:  # e.g. re-raised from a DataLoader worker: the last line is the original error
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        text = lines[-1] if lines else type(exc).__name__
    hint = OS_ERROR_HINTS.get(exc.errno, "")
    return f"{text}{': ' + hint if hint else ''}; the cache keeps every committed segment"


def cli_cache_verify(args: argparse.Namespace) -> int:
    from mmia.cache import verify_cache

    report = verify_cache(args.cache)
    print(report.summary())
    return 0 if report.clean else 1


def cli_cache_info(args: argparse.Namespace) -> int:
    from mmia.cache import cache_info

    stores = cache_info(args.cache)
    print("store\tsegments\trows\tMiB\tsmall segments")
    for s in stores:
        print(f"{s.folder}\t{s.segments}\t{s.rows}\t{s.feature_bytes / 2**20:.1f}\t"
              f"{s.small_segments}")
    index = os.path.join(args.cache, "samples")
    shards = len(os.listdir(index)) if os.path.isdir(index) else 0
    print(f"{len(stores)} stores; sample index of {shards} shards")
    return 0


def cli_cache_compact(args: argparse.Namespace) -> int:
    from mmia.cache import compact_cache

    merged, written = compact_cache(args.cache)
    print(f"merged {merged} segments into {written}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _log_to_stderr()
    with sigterm_as_interrupt():
        return _run(argv)


def _run(argv: list[str]) -> int:
    """Parse and run one command; every failure the user can act on is one stderr line."""
    try:  # building the parser imports the attacks: a broken install must be named, too
        args = build_parser().parse_args(argv)
        args.command_line = "mmia " + " ".join(shlex.quote(a) for a in argv)  # for provenance
        return args.func(args)
    except MmiaError as exc:
        print(f"mmia: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("mmia: terminated by SIGTERM (the cache keeps every committed segment; rerun to "
              "resume)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("mmia: interrupted (the cache keeps every committed segment; rerun to resume)",
              file=sys.stderr)
        return 130
    except ImportError as exc:  # a broken install: say which module, never hide the command
        print(f"mmia: error: cannot import {exc.name or 'a dependency'} ({exc}): the "
              "installation is broken; reinstall mmia and its dependencies", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, read-only or forbidden folder, too many open files
        print(f"mmia: error: {os_error_line(exc)}", file=sys.stderr)
        return 2 if exc.errno in USER_ERRNOS else 1


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
