"""Command line: `mmia embed`, `mmia audit`, `mmia pilot`.

Every user error becomes one line on stderr naming the problem and the fix, and exit code 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from mmia.errors import MmiaError


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="open_clip model name, e.g. ViT-B-32")
    p.add_argument("--pretrained", help="pretrained tag (e.g. openai) or local checkpoint path")
    p.add_argument("--model-config", help="custom open_clip model-config JSON file")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="fp32", help="fp32 (default), fp16, bf16, amp")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 1)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmia", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    embed = sub.add_parser("embed", help="fill the embedding cache from shards")
    add_model_args(embed)
    embed.add_argument("--shards", nargs="+", action="extend", required=True,
                       help="webdataset URL patterns (brace expansion; may repeat)")
    embed.add_argument("--cache", required=True, help="embedding cache folder")
    embed.add_argument("--views", type=int, default=0, help="augmented views per image for AEA")
    embed.set_defaults(func=run_embed)

    try:
        from mmia.audit import add_audit_parsers
    except ImportError:  # the attack layer is optional until it is built
        pass
    else:
        add_audit_parsers(sub)
    return parser


def ensure_writable_dir(path: str, flag: str) -> None:
    """Create a folder the run will write to, or fail with one line naming the flag."""
    import os

    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise MmiaError(f"cannot create {flag.lstrip('-')} folder {path!r} ({exc.strerror}): "
                        f"pass a writable {flag}") from None


def run_embed(args: argparse.Namespace) -> int:
    from mmia.embed import embed_shards
    from mmia.model import load_model
    from mmia.shards import expand_patterns

    expand_patterns(args.shards)  # fail on bad patterns before loading a model
    if args.views < 0 or args.batch_size < 1:
        raise MmiaError("--views must be ≥ 0 and --batch-size ≥ 1")
    ensure_writable_dir(args.cache, "--cache")
    loaded = load_model(args.model, args.pretrained, args.model_config, args.device,
                        args.precision)
    print(f"model {loaded.name} fingerprint {loaded.fingerprint} on {loaded.device}",
          file=sys.stderr)
    result = embed_shards(loaded, args.shards, args.cache, views=args.views,
                          batch_size=args.batch_size, workers=args.workers,
                          progress=not args.no_progress)
    print(result.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.command_line = "mmia " + " ".join(shlex.quote(a) for a in argv)  # for provenance
    try:
        return args.func(args)
    except MmiaError as exc:
        print(f"mmia: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmia: interrupted (the cache keeps every committed segment; rerun to resume)",
              file=sys.stderr)
        return 130
    except PermissionError as exc:
        print(f"mmia: error: no permission to write {exc.filename!r}: choose a writable folder",
              file=sys.stderr)
        return 2
