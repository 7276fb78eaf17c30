"""`mmia data download`: img2dataset into webdataset shards, and a manifest of what became what.

img2dataset runs as a child process from its own environment (it pins webdataset < 0.3, mmia
reads shards with webdataset 1.x; README "Auditing a real model"). Its per-shard Parquet files
(one row per input row: key, status, error_message, and our `id` column) become the manifest:
each input row's shard and key, or why it failed (`failed_to_download`, `failed_to_resize`), or
`missing` when no shard reported it (a shard that never finished).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from mmia.data.metadata import (
    DEFAULT_ENGINE,
    Engine,
    Source,
    duck_errors,
    resolve,
    sql_literal,
    write_parquet,
    write_summary,
)
from mmia.errors import MmiaError

RESIZE_MODES = ("border", "keep_ratio", "keep_ratio_largest", "center_crop", "no")
_CHILD_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}


@dataclass(frozen=True)
class DownloadSettings:
    """img2dataset's settings (the usual LAION ones by default). `img2dataset` is the command;
    None: $MMIA_IMG2DATASET, else `img2dataset` on the PATH."""

    image_size: int = 256
    resize_mode: str = "border"
    encode_quality: int = 95
    retries: int = 2
    timeout: int = 10
    processes: int | None = None  # None: one per core
    threads: int = 64
    samples_per_shard: int = 10_000
    img2dataset: str | None = None

    def check(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise MmiaError(f"--resize-mode {self.resize_mode!r}: use one of "
                            f"{', '.join(RESIZE_MODES)}")
        if not 1 <= self.encode_quality <= 100:
            raise MmiaError("--encode-quality must be from 1 to 100")
        for name in ("image_size", "timeout", "threads", "samples_per_shard"):
            if getattr(self, name) < 1:
                raise MmiaError(f"--{name.replace('_', '-')} must be at least 1")
        if self.retries < 0 or (self.processes is not None and self.processes < 1):
            raise MmiaError("--retries must be ≥ 0 and --processes ≥ 1")


@dataclass
class DownloadResult:
    """Counts of one download: downloaded + failed + missing == rows."""

    rows: int
    downloaded: int
    failed_to_download: int
    failed_to_resize: int
    missing: int
    reasons: dict[str, int]
    shards: list[str]
    pattern: str
    output: str
    manifest: str
    log: str
    command: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    summary_path: str = ""

    @property
    def failed(self) -> int:
        return self.failed_to_download + self.failed_to_resize

    def summary(self) -> dict:
        return {"command": "download", "rows": self.rows, "downloaded": self.downloaded,
                "failed": self.failed, "failed_to_download": self.failed_to_download,
                "failed_to_resize": self.failed_to_resize, "missing": self.missing,
                "reasons": self.reasons, "shards": len(self.shards), "pattern": self.pattern,
                "output": self.output, "manifest": self.manifest, "log": self.log,
                "settings": self.settings, "img2dataset": self.command}


def find_img2dataset(command: str | None) -> str:
    """The img2dataset executable, or one line saying how to install it."""
    command = command or os.environ.get("MMIA_IMG2DATASET") or "img2dataset"
    found = shutil.which(command)
    if found is None:
        raise MmiaError(f"img2dataset not found ({command!r}): install it in its own environment "
                        "(python -m venv i2d && i2d/bin/pip install img2dataset==1.47.0) and pass "
                        "--img2dataset i2d/bin/img2dataset or set MMIA_IMG2DATASET")
    return found


def img2dataset_command(exe: str, url_list: str, out_dir: str,
                        s: DownloadSettings) -> list[str]:
    """img2dataset's command line: webdataset shards, captions, our `id` kept in every row."""
    processes = s.processes or os.cpu_count() or 1
    return [exe, f"--url_list={url_list}", "--input_format=parquet", "--url_col=url",
            "--caption_col=caption", '--save_additional_columns=["id"]',
            "--output_format=webdataset", f"--output_folder={out_dir}",
            f"--image_size={s.image_size}", f"--resize_mode={s.resize_mode}",
            f"--encode_quality={s.encode_quality}", f"--retries={s.retries}",
            f"--timeout={s.timeout}", f"--processes_count={processes}",
            f"--thread_count={s.threads}", f"--number_sample_per_shard={s.samples_per_shard}",
            "--enable_wandb=False", "--incremental_mode=incremental"]


def download(source: Source, out_dir: str, settings: DownloadSettings | None = None,
             engine: Engine = DEFAULT_ENGINE) -> DownloadResult:
    """Download `source`'s rows into `out_dir` (NNNNN.tar + img2dataset's Parquet and stats);
    write `<out_dir>.manifest.parquet` and `<out_dir>.summary.json`. Rerunning resumes: shards
    img2dataset finished are kept."""
    settings = settings or DownloadSettings()
    settings.check()
    exe = find_img2dataset(settings.img2dataset)
    out_dir = out_dir.rstrip("/")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise MmiaError(f"--out {out_dir!r} is a file: pass a folder for the shards")
    log = out_dir + ".img2dataset.log"
    manifest = out_dir + ".manifest.parquet"
    with engine.connect(out_dir) as con, duck_errors("download failed"):
        src = resolve(con, source).select(("id", "url", "caption"))
        con.execute(f"CREATE TEMP TABLE input AS {src}").fetchall()
        _refuse_repeated_ids(con, source.paths[0])
        with tempfile.TemporaryDirectory(prefix=".mmia-i2d-",
                                         dir=os.path.dirname(os.path.abspath(out_dir))) as tmp:
            url_list = os.path.join(tmp, "input.parquet")
            write_parquet(con, "SELECT url, caption, id FROM input", url_list)
            command = img2dataset_command(exe, url_list, os.path.abspath(out_dir), settings)
            run_child(command, log)
        _read_reports(con, out_dir, source.paths[0])
        write_parquet(con, "SELECT * FROM manifest ORDER BY id", manifest)
        result = _result(con, out_dir, manifest, log, command, settings)
    result.summary_path = write_summary(out_dir, result.summary())
    return result


def _refuse_repeated_ids(con, name: str) -> None:
    rows, distinct = con.execute("SELECT count(*), count(DISTINCT id) FROM input").fetchall()[0]
    if distinct < rows:
        raise MmiaError(f"{name!r}: {rows - distinct} rows repeat another row's id: the manifest "
                        "could not tell them apart (sample or de-duplicate first)")


def run_child(command: Sequence[str], log: str) -> None:
    """Run img2dataset, its output appended to `log`; failure is one line naming the log.
    Ctrl-C / SIGTERM reach it as SIGINT (it cleans up), then SIGKILL after 30 s."""
    env = {**os.environ, **_CHILD_ENV}
    with open(log, "a") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
        try:
            code = child.wait()
        except BaseException:
            _stop(child)
            raise
    if code != 0:
        raise MmiaError(f"img2dataset failed (exit {code}): {_last_line(log)}; full log {log}")


def _stop(child: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGINT)
    try:
        child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def _last_line(path: str) -> str:
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f.read()[-20_000:].splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _read_reports(con, out_dir: str, name: str) -> None:
    """Temp table `manifest`: each input row with its status, shard and key from img2dataset's
    per-shard Parquet files (a row reported twice, by a retried shard: its success wins)."""
    reports = sorted(glob.glob(os.path.join(glob.escape(out_dir), "[0-9]*.parquet")))
    if reports:
        con.execute(f"CREATE TEMP TABLE got AS SELECT CAST(id AS VARCHAR) AS id, key, status, "
                    f"error_message, regexp_extract(filename, '([0-9]+)[.]parquet$', 1) AS shard "
                    f"FROM read_parquet([{', '.join(sql_literal(r) for r in reports)}], "
                    f"filename = true, union_by_name = true) QUALIFY row_number() OVER "
                    f"(PARTITION BY id ORDER BY status = 'success' DESC, shard) = 1").fetchall()
    else:
        con.execute("CREATE TEMP TABLE got (id VARCHAR, key VARCHAR, status VARCHAR, "
                    "error_message VARCHAR, shard VARCHAR)").fetchall()
    foreign = con.execute("SELECT count(*) FROM got WHERE id NOT IN (SELECT id FROM input)"
                          ).fetchall()[0][0]
    if foreign:
        raise MmiaError(f"{out_dir!r} holds {foreign} rows that are not in {name!r} (shards of "
                        "another input): pass an empty --out")
    folder = sql_literal(os.path.abspath(out_dir) + os.sep)
    con.execute(f"CREATE TEMP TABLE manifest AS SELECT i.id, i.url, coalesce(g.status, 'missing') "
                f"AS status, g.error_message AS error, CASE WHEN g.status = 'success' THEN "
                f"{folder} || g.shard || '.tar' END AS shard, CASE WHEN g.status = 'success' "
                f"THEN g.key END AS key FROM input i LEFT JOIN got g USING (id)").fetchall()


def _result(con, out_dir: str, manifest: str, log: str, command: list[str],
            settings: DownloadSettings) -> DownloadResult:
    counts = dict(con.execute("SELECT status, count(*) FROM manifest GROUP BY ALL").fetchall())
    reasons = dict(con.execute("SELECT coalesce(error, status), count(*) AS n FROM manifest "
                               "WHERE status <> 'success' GROUP BY ALL ORDER BY n DESC, 1 "
                               "LIMIT 10").fetchall())
    shards = [r[0] for r in con.execute("SELECT DISTINCT shard FROM manifest WHERE shard IS NOT "
                                        "NULL ORDER BY shard").fetchall()]
    absent = [s for s in shards if not os.path.isfile(s)]
    if absent:
        raise MmiaError(f"img2dataset reported samples in {absent[0]!r}, which does not exist: "
                        f"see {log}")
    known = {"success", "failed_to_download", "failed_to_resize", "missing"}
    other = sum(n for s, n in counts.items() if s not in known)
    return DownloadResult(
        rows=sum(counts.values()), downloaded=counts.get("success", 0),
        failed_to_download=counts.get("failed_to_download", 0) + other,
        failed_to_resize=counts.get("failed_to_resize", 0), missing=counts.get("missing", 0),
        reasons=reasons, shards=shards, pattern=shard_pattern(out_dir, shards), output=out_dir,
        manifest=manifest, log=log, command=command, settings=asdict(settings))


def shard_pattern(out_dir: str, shards: Sequence[str]) -> str:
    """One brace pattern naming exactly `shards` (NNNNN.tar in `out_dir`), for `mmia audit`."""
    ids = sorted(os.path.basename(s).removesuffix(".tar") for s in shards)
    if not ids:
        return ""
    if len(ids) == 1:
        return os.path.join(out_dir, f"{ids[0]}.tar")
    numbers = [int(i) for i in ids]
    contiguous = numbers == list(range(numbers[0], numbers[-1] + 1))
    inner = f"{ids[0]}..{ids[-1]}" if contiguous else ",".join(ids)
    return os.path.join(out_dir, f"{{{inner}}}.tar")
