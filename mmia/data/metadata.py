"""Reading image–caption metadata through DuckDB, with a column mapping and presets.

Every `mmia data` command sees its inputs as one SQL relation with the canonical columns
`id, url, caption, date` (all VARCHAR; `date` may be NULL), whatever the files call them:
Parquet, CSV, TSV (header-less ones get their column names from the preset) or JSON lines,
optionally compressed (.gz, .zst). Without an id column a row's id is the first 16 hex digits of
md5(url, caption) (also where the id column is NULL): the same pair always gets the same id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from mmia.errors import MmiaError

CANONICAL = ("id", "url", "caption", "date")
FORMATS = ("parquet", "csv", "tsv", "jsonl")
_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv",
               ".txt": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
_COMPRESSIONS = (".gz", ".zst", ".zstd")


@dataclass(frozen=True)
class Columns:
    """Which input column holds each canonical field. `date` and `id` are optional: None means
    the input has none. `names` names the columns of a header-less CSV/TSV. `strict` lists the
    fields the user named explicitly: those must exist; the others are used when present."""

    url: str = "url"
    caption: str = "caption"
    date: str | None = "date"
    id: str | None = "id"
    names: tuple[str, ...] | None = None
    strict: frozenset[str] = field(default_factory=frozenset)

    def override(self, **given: str | None) -> Columns:
        """This mapping with the fields the user gave (None = not given) replaced, and strict."""
        given = {k: v for k, v in given.items() if v is not None}
        return dataclasses.replace(self, **given, strict=self.strict | set(given))


PRESETS: dict[str, Columns] = {
    # what every `mmia data` command writes (the default)
    "mmia": Columns(),
    # LAION-400M / LAION-2B metadata parquet (URL, TEXT, similarity, …)
    "laion": Columns(url="URL", caption="TEXT", date=None, id=None),
    # Conceptual Captions 3M TSV: caption <tab> url, no header
    "cc3m": Columns(date=None, id=None, names=("caption", "url")),
    # Conceptual 12M cc12m.tsv: url <tab> caption, no header
    "cc12m": Columns(date=None, id=None, names=("url", "caption")),
    # DataComp metadata parquet (uid, url, text, …)
    "datacomp": Columns(caption="text", date=None, id="uid"),
    # COYO-700M parquet (id, url, text, …)
    "coyo": Columns(caption="text", date=None, id="id"),
    # Reddit submissions (Pushshift / Arctic Shift JSON lines: url, title, created_utc)
    "reddit": Columns(caption="title", date="created_utc", id="id"),
}


@dataclass(frozen=True)
class Source:
    """Metadata files (paths or glob patterns) read with one column mapping."""

    paths: tuple[str, ...]
    columns: Columns = Columns()
    format: str | None = None  # None: from the first file's extension

    def files(self) -> list[str]:
        """Every file the paths name; a missing file or an empty glob is one line."""
        if not self.paths:
            raise MmiaError("no metadata file given")
        found: list[str] = []
        for path in self.paths:
            if glob.has_magic(path):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise MmiaError(f"metadata pattern {path!r} matches no file: check the path")
                found += matches
            elif os.path.isdir(path):
                raise MmiaError(f"metadata path {path!r} is a folder: pass its files "
                                f"(e.g. '{path.rstrip('/')}/*.parquet')")
            elif not os.path.isfile(path):
                raise MmiaError(f"metadata file {path!r} does not exist: check the path")
            else:
                found.append(path)
        return found

    def file_format(self, files: Sequence[str]) -> str:
        if self.format is not None:
            if self.format not in FORMATS:
                raise MmiaError(f"unknown metadata format {self.format!r}: "
                                f"use one of {', '.join(FORMATS)}")
            return self.format
        kinds = {_format_of(f) for f in files}
        if len(kinds) > 1:
            raise MmiaError(f"metadata files of several formats given "
                            f"({', '.join(sorted(kinds))}): pass one format per command")
        return kinds.pop()


def _format_of(path: str) -> str:
    name = path.lower()
    for ext in _COMPRESSIONS:
        name = name.removesuffix(ext)
    fmt = _EXTENSIONS.get(os.path.splitext(name)[1])
    if fmt is None:
        raise MmiaError(f"cannot tell the format of {path!r} from its name: pass --format "
                        f"({', '.join(FORMATS)})")
    return fmt


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(sql_literal(v) for v in values) + "]"


def reader_sql(files: Sequence[str], fmt: str, names: tuple[str, ...] | None) -> str:
    """The DuckDB table function that scans `files`: every value as text, bad lines skipped
    (and counted in DuckDB's reject_errors table: `rejected_lines`)."""
    paths = _sql_list(files)
    if fmt == "parquet":
        return f"read_parquet({paths}, union_by_name = true)"
    if fmt == "jsonl":
        return f"read_json({paths}, format = 'newline_delimited', ignore_errors = true)"
    options = ["ignore_errors = true", "store_rejects = true"]
    options += ["delim = '\t'", "quote = ''", "escape = ''"] if fmt == "tsv" else ["delim = ','"]
    if names:
        cols = ", ".join(f"{sql_literal(n)}: 'VARCHAR'" for n in names)
        options += ["header = false", f"columns = {{{cols}}}"]
    else:
        options += ["header = true", "all_varchar = true"]
    return f"read_csv({paths}, {', '.join(options)})"


@dataclass(frozen=True)
class Resolved:
    """A source's scan and the SQL of each canonical field; `mapped`: fields the input has."""

    scan: str
    exprs: dict[str, str]
    mapped: frozenset[str]

    def select(self, fields: Sequence[str] = CANONICAL) -> str:
        return "SELECT " + ", ".join(f"{self.exprs[f]} AS {f}" for f in fields) + \
            f" FROM {self.scan}"


def resolve(con, source: Source) -> Resolved:
    """Find `source`'s files, format and columns; a missing column is one line."""
    files = source.files()
    fmt = source.file_format(files)
    scan = reader_sql(files, fmt, source.columns.names)
    with duck_errors(f"cannot read {files[0]!r} as {fmt}"):
        described = con.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()
    types = {row[0]: row[1] for row in described}
    exprs, mapped = _column_exprs(source.columns, types, files[0])
    return Resolved(scan, exprs, frozenset(mapped))


def relation(con, source: Source, fields: Sequence[str] = CANONICAL) -> str:
    """A SQL query giving `source` as the canonical `fields` (VARCHAR, in that order)."""
    return resolve(con, source).select(fields)


def _column_exprs(cols: Columns, types: dict[str, str],
                  first: str) -> tuple[dict[str, str], set[str]]:
    """SQL for each canonical field from the input's columns (JSON values unquoted), and the
    fields the input has."""
    def text(name: str) -> str:
        ident = quote_ident(name)
        return f"({ident} ->> '$')" if types[name] == "JSON" else f"CAST({ident} AS VARCHAR)"

    exprs: dict[str, str] = {}
    for canonical in ("url", "caption", "date", "id"):
        name = getattr(cols, canonical)
        if name is not None and name in types:
            exprs[canonical] = text(name)
        elif name is not None and (canonical in ("url", "caption") or canonical in cols.strict):
            raise MmiaError(f"{first!r} has no column {name!r} for the {canonical}: its columns "
                            f"are {', '.join(types) or 'none'}; pass --{canonical}-col or --preset")
    mapped = set(exprs)
    exprs.setdefault("date", "CAST(NULL AS VARCHAR)")
    content_id = content_id_sql(exprs["url"], exprs["caption"])  # also where an id is NULL
    exprs["id"] = f"coalesce({exprs['id']}, {content_id})" if "id" in exprs else content_id
    return exprs, mapped


def content_id_sql(url: str, caption: str) -> str:
    """The id of a row without one: 16 hex digits of md5(url US caption)."""
    return f"substr(md5(coalesce({url}, '') || chr(31) || coalesce({caption}, '')), 1, 16)"


def rejected_lines(con) -> int:
    """CSV/TSV lines DuckDB could not parse in this connection (each line counted once)."""
    try:
        return con.execute("SELECT count(DISTINCT (file_id, line)) FROM reject_errors"
                           ).fetchall()[0][0]
    except Exception:  # no CSV was read: the table does not exist
        return 0


@dataclass(frozen=True)
class Engine:
    """DuckDB resources: threads (None: all cores), a memory limit past which joins and sorts
    spill to `temp_dir` (None: a temporary folder beside the output, removed afterwards)."""

    threads: int | None = None
    memory_limit: str = "2GB"
    temp_dir: str | None = None

    @contextlib.contextmanager
    def connect(self, beside: str) -> Iterator:
        import duckdb

        parent = os.path.dirname(os.path.abspath(beside))
        os.makedirs(parent, exist_ok=True)
        with contextlib.ExitStack() as stack:
            temp = self.temp_dir or stack.enter_context(
                tempfile.TemporaryDirectory(prefix=".mmia-duckdb-", dir=parent))
            config = {"memory_limit": self.memory_limit, "temp_directory": temp,
                      "preserve_insertion_order": False,
                      "autoinstall_known_extensions": False}
            if self.threads is not None:
                config["threads"] = self.threads
            with duck_errors("cannot start DuckDB"):
                con = duckdb.connect(config=config)
            stack.callback(con.close)
            con.execute("SET TimeZone = 'UTC'")
            yield con


DEFAULT_ENGINE = Engine()


@contextlib.contextmanager
def duck_errors(what: str) -> Iterator[None]:
    """DuckDB's errors as one-line MmiaErrors."""
    import duckdb

    try:
        yield
    except duckdb.OutOfMemoryException as exc:
        raise MmiaError(f"{what}: DuckDB ran out of memory ({_first_line(exc)}): raise "
                        "--memory-limit or point --temp-dir at a disk with free space") from None
    except duckdb.Error as exc:
        raise MmiaError(f"{what}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def check_output(path: str, what: str = "--out") -> str:
    """A Parquet output path whose folder can be created."""
    if not path.endswith(".parquet"):
        raise MmiaError(f"{what} {path!r} must end in .parquet (mmia writes Parquet)")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise MmiaError(f"cannot create the folder of {what} {path!r} ({exc.strerror})") from None
    return path


def write_parquet(con, select_sql: str, path: str, params: Sequence | None = None) -> None:
    """COPY a query's rows to `path` through a temporary name (never a half-written file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with duck_errors(f"cannot write {path!r}"):
            con.execute(f"COPY ({select_sql}) TO {sql_literal(tmp)} "
                        "(FORMAT parquet, COMPRESSION zstd)", params or []).fetchall()
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def summary_path(output: str) -> str:
    return output.rstrip("/") + ".summary.json"


def write_summary(output: str, summary: dict) -> str:
    """`<output>.summary.json`, written atomically."""
    path = summary_path(output)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path
