"""`mmia data …`: the argument parsers and the handlers that print (the API never does)."""

from __future__ import annotations

import argparse
import dataclasses

from mmia.checks import integer
from mmia.data.metadata import FORMATS, PRESETS, Columns, Engine, Source


def add_data_parser(sub) -> None:
    p = sub.add_parser("data", help="build member / non-member / post-release / pool sets from "
                       "image–caption metadata and download them (README: Auditing a real model)")
    steps = p.add_subparsers(dest="step", required=True)
    _add_sample(steps)
    _add_dedup(steps)
    _add_after(steps)
    _add_pool(steps)
    _add_download(steps)


def _add_source_args(p: argparse.ArgumentParser, prefix: str = "", what: str = "input") -> None:
    """--preset, --url-col … (or --training-preset …): how to read one set of files."""
    flag = f"--{prefix}" if prefix else "--"
    dest = prefix.replace("-", "_")
    p.add_argument(f"{flag}preset", dest=f"{dest}preset", choices=sorted(PRESETS),
                   default="mmia", help=f"column names of the {what} (default mmia: id, url, "
                   "caption, date as every mmia data command writes them)")
    for field in ("url", "caption", "date", "id"):
        p.add_argument(f"{flag}{field}-col", dest=f"{dest}{field}_col",
                       help=f"the {what}'s {field} column (overrides the preset)")
    p.add_argument(f"{flag}names", dest=f"{dest}names",
                   help=f"comma-separated column names of a header-less CSV/TSV {what}")
    p.add_argument(f"{flag}format", dest=f"{dest}format", choices=FORMATS,
                   help="file format (default: from the extension)")


def _source(args: argparse.Namespace, paths, prefix: str = "") -> Source:
    get = lambda name: getattr(args, prefix + name)  # noqa: E731
    names = tuple(n.strip() for n in get("names").split(",")) if get("names") else None
    cols: Columns = PRESETS[get("preset")].override(
        url=get("url_col"), caption=get("caption_col"), date=get("date_col"), id=get("id_col"))
    if names:
        cols = dataclasses.replace(cols, names=names)
    return Source(tuple(paths), cols, get("format"))


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DuckDB")
    g.add_argument("--threads", type=integer, help="threads (default: all cores)")
    g.add_argument("--memory-limit", default="2GB",
                   help="memory past which joins and sorts spill to disk (default 2GB)")
    g.add_argument("--temp-dir", help="where DuckDB spills (default: a temporary folder "
                   "beside the output)")


def _engine(args: argparse.Namespace) -> Engine:
    return Engine(threads=args.threads, memory_limit=args.memory_limit, temp_dir=args.temp_dir)


def _add_sample(steps) -> None:
    p = steps.add_parser("sample", help="a seeded sample of N rows (several -n/--out pairs: "
                         "disjoint slices of one draw)")
    p.add_argument("inputs", nargs="+", help="metadata files or glob patterns")
    p.add_argument("-n", dest="sizes", type=integer, nargs="+", required=True,
                   help="rows per output, in --out's order")
    p.add_argument("--out", nargs="+", required=True, help="Parquet output(s)")
    p.add_argument("--seed", type=integer, default=0)
    _add_source_args(p)
    _add_engine_args(p)
    p.set_defaults(func=cli_data_sample)


def _add_dedup(steps) -> None:
    p = steps.add_parser("dedup", help="drop rows whose URL or normalised caption is in the "
                         "training metadata (Ko et al.'s rule)")
    p.add_argument("inputs", nargs="+", help="candidate metadata files")
    p.add_argument("--training", nargs="+", required=True,
                   help="the model's training metadata (files or glob patterns)")
    p.add_argument("--out", required=True, help="Parquet output: the rows kept")
    _add_source_args(p)
    _add_source_args(p, "training-", "training metadata")
    _add_engine_args(p)
    p.set_defaults(func=cli_data_dedup)


def _add_after(steps) -> None:
    p = steps.add_parser("after", help="keep rows dated after the model's release")
    p.add_argument("inputs", nargs="+", help="metadata files with a date column")
    p.add_argument("--released", required=True, help="release date YYYY-MM-DD (rows dated on "
                   "a later UTC day are kept)")
    p.add_argument("--out", required=True, help="Parquet output: the rows kept")
    _add_source_args(p)
    _add_engine_args(p)
    p.set_defaults(func=cli_data_after)


def _add_pool(steps) -> None:
    p = steps.add_parser("pool", help="mix members and non-members into an unlabelled WSA pool; "
                         "the labels go to a separate truth file")
    p.add_argument("--members", nargs="+", required=True)
    p.add_argument("--nonmembers", nargs="+", required=True)
    p.add_argument("--out", required=True, help="Parquet output: the pool (no labels, no dates)")
    p.add_argument("--truth", help="Parquet output: the labels, for evaluation only "
                   "(default: OUT with .truth.parquet)")
    p.add_argument("--seed", type=integer, default=0)
    _add_engine_args(p)
    p.set_defaults(func=cli_data_pool)


def _add_download(steps) -> None:
    from mmia.data.download import RESIZE_MODES, DownloadSettings

    d = DownloadSettings()
    p = steps.add_parser("download", help="img2dataset into webdataset shards, plus a manifest "
                         "of each row's shard key or failure")
    p.add_argument("inputs", nargs="+", help="metadata files (id, url, caption)")
    p.add_argument("--out", required=True, help="folder for NNNNN.tar shards")
    p.add_argument("--image-size", type=integer, default=d.image_size)
    p.add_argument("--resize-mode", default=d.resize_mode, choices=RESIZE_MODES)
    p.add_argument("--encode-quality", type=integer, default=d.encode_quality)
    p.add_argument("--retries", type=integer, default=d.retries)
    p.add_argument("--timeout", type=integer, default=d.timeout, help="seconds per image")
    p.add_argument("--processes", type=integer, help="img2dataset processes (default: cores)")
    p.add_argument("--download-threads", type=integer, default=d.threads,
                   help="download threads per process")
    p.add_argument("--samples-per-shard", type=integer, default=d.samples_per_shard)
    p.add_argument("--img2dataset", help="img2dataset command (default: $MMIA_IMG2DATASET, "
                   "else img2dataset on the PATH)")
    _add_source_args(p)
    _add_engine_args(p)
    p.set_defaults(func=cli_data_download)


def cli_data_sample(args: argparse.Namespace) -> int:
    from mmia.data.select import sample

    r = sample(_source(args, args.inputs), args.out, args.sizes, args.seed, _engine(args))
    print(f"sample: {r.rows} rows read ({r.no_url} without a URL, {r.duplicate_ids} repeated "
          f"ids passed over, {r.unreadable_lines} unreadable lines)")
    for out, n in zip(r.outputs, r.written, strict=True):
        print(f"wrote {n} rows to {out}")
    return 0


def cli_data_dedup(args: argparse.Namespace) -> int:
    from mmia.data.dedup import dedup

    r = dedup(_source(args, args.inputs), _source(args, args.training, "training_"), args.out,
              _engine(args))
    print(f"dedup: {r.rows} candidates against {r.training_rows} training rows: dropped "
          f"{r.dropped_url} by URL, {r.dropped_caption} by normalised caption; kept {r.kept} "
          f"({r.empty_normalised} with a caption that normalises to nothing)")
    print(f"wrote {r.kept} rows to {r.output}, counts to {r.summary_path}")
    return 0


def cli_data_after(args: argparse.Namespace) -> int:
    from mmia.data.select import after, parse_day

    r = after(_source(args, args.inputs), args.out, parse_day(args.released), _engine(args))
    print(f"after {r.released}: {r.rows} rows: kept {r.kept}, {r.not_after} dated on or "
          f"before, {r.missing_date + r.unreadable_date} without a usable date "
          f"({r.missing_date} missing, {r.unreadable_date} unreadable)")
    print(f"wrote {r.kept} rows to {r.output}, counts to {r.summary_path}")
    return 0


def cli_data_pool(args: argparse.Namespace) -> int:
    from mmia.data.select import pool

    plain = PRESETS["mmia"]
    r = pool(Source(tuple(args.members), plain), Source(tuple(args.nonmembers), plain),
             args.out, args.truth, args.seed, _engine(args))
    print(f"pool: {r.rows} rows ({r.members} members, {r.nonmembers} non-members) to "
          f"{r.output}; labels to {r.truth} (evaluation only)")
    return 0


def cli_data_download(args: argparse.Namespace) -> int:
    from mmia.data.download import DownloadSettings, download

    settings = DownloadSettings(
        image_size=args.image_size, resize_mode=args.resize_mode,
        encode_quality=args.encode_quality, retries=args.retries, timeout=args.timeout,
        processes=args.processes, threads=args.download_threads,
        samples_per_shard=args.samples_per_shard, img2dataset=args.img2dataset)
    r = download(_source(args, args.inputs), args.out, settings, _engine(args))
    print(f"download: {r.rows} rows: {r.downloaded} downloaded, {r.failed} failed "
          f"({r.failed_to_download} download, {r.failed_to_resize} decode/resize), "
          f"{r.missing} missing")
    for reason, n in r.reasons.items():
        print(f"  {n} × {reason}")
    print(f"shards: {r.pattern or 'none'}; manifest {r.manifest}; log {r.log}")
    return 0
