"""Choosing rows: a seeded sample (`sample`), rows dated after a release (`after`) and a mixed,
unlabelled WSA pool with its labels kept apart (`pool`)."""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from mmia.data.metadata import (
    DEFAULT_ENGINE,
    Engine,
    Source,
    check_output,
    duck_errors,
    rejected_lines,
    resolve,
    write_parquet,
    write_summary,
)
from mmia.errors import MmiaError

_HAS_URL = "url IS NOT NULL AND trim(url) <> ''"


@dataclass
class SampleResult:
    """Counts of one sample: `rows` read, `no_url` and `duplicate_ids` never drawn; `written`
    rows per output (disjoint slices of one seeded order)."""

    rows: int
    no_url: int
    duplicate_ids: int
    unreadable_lines: int
    outputs: list[str]
    written: list[int]
    seed: int
    summary_paths: list[str] = field(default_factory=list)

    def summary(self, i: int) -> dict:
        return {"command": "sample", "rows": self.rows, "no_url": self.no_url,
                "duplicate_ids": self.duplicate_ids, "unreadable_lines": self.unreadable_lines,
                "written": self.written[i], "seed": self.seed, "slice": i,
                "outputs": self.outputs, "output": self.outputs[i]}


def sample(source: Source, outs: Sequence[str], sizes: Sequence[int], seed: int = 0,
           engine: Engine = DEFAULT_ENGINE) -> SampleResult:
    """Draw sum(sizes) distinct rows in a seeded order (md5 of seed, id, url: the same rows on
    any machine and for any file order) and write consecutive slices of `sizes` rows to `outs`."""
    if len(outs) != len(sizes) or not outs:
        raise MmiaError(f"{len(sizes)} sizes (-n) for {len(outs)} outputs (--out): give one "
                        "size per output")
    if any(n < 1 for n in sizes):
        raise MmiaError("every sample size (-n) must be at least 1")
    if len(set(map(os.path.abspath, outs))) != len(outs):
        raise MmiaError("the same --out is given twice: give each slice its own file")
    for out in outs:
        check_output(out)
    total = sum(sizes)
    with engine.connect(outs[0]) as con, duck_errors("sampling failed"):
        src = resolve(con, source).select()
        rows, usable = con.execute(f"SELECT count(*), count(*) FILTER (WHERE {_HAS_URL}) "
                                   f"FROM ({src})").fetchall()[0]
        picked, duplicates = _draw(con, src, total, seed, usable)
        if picked < total:
            raise MmiaError(f"{source.paths[0]!r}: only {picked} distinct rows with a URL "
                            f"(of {rows}), {total} asked for: lower -n")
        written, start = [], 0
        for out, n in zip(outs, sizes, strict=True):
            write_parquet(con, "SELECT id, url, caption, date FROM picked WHERE pick > ? AND "
                          "pick <= ? ORDER BY pick", out, [start, start + n])
            written.append(n)
            start += n
        result = SampleResult(rows=rows, no_url=rows - usable, duplicate_ids=duplicates,
                              unreadable_lines=rejected_lines(con), outputs=list(outs),
                              written=written, seed=seed)
    result.summary_paths = [write_summary(out, result.summary(i)) for i, out in enumerate(outs)]
    return result


def _draw(con, src: str, total: int, seed: int, usable: int) -> tuple[int, int]:
    """Fill temp table `picked` (pick 1…) with the first `total` distinct ids in seeded order;
    returns (rows picked, repeated ids passed over on the way). A top-N scan: memory O(N)."""
    limit = total
    while True:
        con.execute("DROP TABLE IF EXISTS top").fetchall()
        con.execute(f"CREATE TEMP TABLE top AS SELECT *, row_number() OVER (ORDER BY k, id, url, "
                    f"caption) AS pos FROM (SELECT *, md5(? || chr(31) || id || chr(31) || url) "
                    f"AS k FROM ({src}) WHERE {_HAS_URL} ORDER BY k, id, url, caption LIMIT ?)",
                    [str(seed), limit]).fetchall()
        con.execute("CREATE OR REPLACE TEMP TABLE picked AS SELECT *, row_number() OVER "
                    "(ORDER BY pos) AS pick FROM (SELECT * FROM top QUALIFY row_number() OVER "
                    "(PARTITION BY id ORDER BY pos) = 1)").fetchall()
        picked, fetched = con.execute("SELECT (SELECT count(*) FROM picked), "
                                      "(SELECT count(*) FROM top)").fetchall()[0]
        if picked >= total or fetched >= usable:
            break
        limit = min(usable, 2 * limit)
    picked = min(picked, total)
    last = con.execute("SELECT coalesce(max(pos), 0) FROM picked WHERE pick <= ?",
                       [picked]).fetchall()[0][0]
    return picked, last - picked


# A date: ISO 8601 text (time and UTC offset optional) or Unix epoch seconds (1973 to 5138);
# compared as the UTC calendar day.
_DATE_SQL = """CASE
  WHEN TRY_CAST(trim(date) AS DOUBLE) IS NOT NULL THEN CASE
    WHEN TRY_CAST(trim(date) AS DOUBLE) BETWEEN 1e8 AND 1e11
    THEN CAST(to_timestamp(TRY_CAST(trim(date) AS DOUBLE)) AS DATE) END
  ELSE CAST(TRY_CAST(trim(date) AS TIMESTAMPTZ) AS DATE) END"""


@dataclass
class AfterResult:
    """Counts of one `after`: kept + not_after + missing_date + unreadable_date == rows."""

    rows: int
    kept: int
    not_after: int
    missing_date: int
    unreadable_date: int
    released: str
    unreadable_examples: list[str] = field(default_factory=list)
    output: str = ""
    summary_path: str = ""

    def summary(self) -> dict:
        return {"command": "after", "released": self.released, "rows": self.rows,
                "kept": self.kept, "not_after": self.not_after,
                "no_date": self.missing_date + self.unreadable_date,
                "missing_date": self.missing_date, "unreadable_date": self.unreadable_date,
                "unreadable_examples": self.unreadable_examples,
                "rule": "kept when the row's UTC calendar date is later than the release date",
                "output": self.output}


def parse_day(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise MmiaError(f"--released {text!r} is not a date: use YYYY-MM-DD") from None


def after(source: Source, out: str, released: datetime.date,
          engine: Engine = DEFAULT_ENGINE) -> AfterResult:
    """Write the rows dated strictly after `released` (UTC day) to `out`; count the others."""
    check_output(out)
    with engine.connect(out) as con, duck_errors("date filter failed"):
        resolved = resolve(con, source)
        if "date" not in resolved.mapped:
            raise MmiaError(f"{source.paths[0]!r} has no date column "
                            f"({source.columns.date or 'none in this preset'}): pass --date-col")
        con.execute(f"CREATE TEMP TABLE dated AS SELECT *, CASE "
                    f"WHEN date IS NULL OR trim(date) = '' THEN 'missing_date' "
                    f"WHEN day IS NULL THEN 'unreadable_date' "
                    f"WHEN day > ? THEN 'kept' ELSE 'not_after' END AS status FROM "
                    f"(SELECT *, {_DATE_SQL} AS day FROM ({resolved.select()}))",
                    [released]).fetchall()
        write_parquet(con, "SELECT id, url, caption, date FROM dated WHERE status = 'kept' "
                      "ORDER BY day, id", out)
        counts = dict(con.execute("SELECT status, count(*) FROM dated GROUP BY ALL").fetchall())
        examples = [r[0] for r in con.execute(
            "SELECT DISTINCT date FROM dated WHERE status = 'unreadable_date' ORDER BY date "
            "LIMIT 3").fetchall()]
    result = AfterResult(rows=sum(counts.values()), kept=counts.get("kept", 0),
                         not_after=counts.get("not_after", 0),
                         missing_date=counts.get("missing_date", 0),
                         unreadable_date=counts.get("unreadable_date", 0),
                         released=released.isoformat(), unreadable_examples=examples, output=out)
    result.summary_path = write_summary(out, result.summary())
    return result


@dataclass
class PoolResult:
    """Counts of one pool: members + nonmembers == rows."""

    members: int
    nonmembers: int
    rows: int
    seed: int
    output: str = ""
    truth: str = ""
    summary_path: str = ""

    def summary(self) -> dict:
        return {"command": "pool", "rows": self.rows, "members": self.members,
                "nonmembers": self.nonmembers, "seed": self.seed, "output": self.output,
                "truth": self.truth}


def default_truth_path(out: str) -> str:
    return out.removesuffix(".parquet") + ".truth.parquet"


def pool(members: Source, nonmembers: Source, out: str, truth: str | None = None, seed: int = 0,
         engine: Engine = DEFAULT_ENGINE) -> PoolResult:
    """Mix member and non-member rows into one unlabelled pool for WSA, in a seeded order, with
    fresh ids (`pool-` + 16 hex digits) and no dates, so that nothing in the pool tells the two
    apart; the labels go to `truth` (id, member 1/0, source_id, source), for evaluation only."""
    truth = truth or default_truth_path(out)
    check_output(out)
    check_output(truth, "--truth")
    if os.path.abspath(truth) == os.path.abspath(out):
        raise MmiaError("--truth must differ from --out: the labels stay out of the pool")
    with engine.connect(out) as con, duck_errors("pool failed"):
        for name, src, label in (("m", members, 1), ("n", nonmembers, 0)):
            con.execute(f"CREATE TEMP TABLE {name} AS SELECT *, {label} AS member FROM "
                        f"({resolve(con, src).select()})").fetchall()
        _refuse_overlap(con, members, nonmembers)
        con.execute("CREATE TEMP TABLE p AS SELECT 'pool-' || substr(md5(? || chr(31) || id || "
                    "chr(31) || url), 1, 16) AS pool_id, * FROM (SELECT * FROM m UNION ALL "
                    "SELECT * FROM n)", [str(seed)]).fetchall()
        rows, distinct = con.execute("SELECT count(*), count(DISTINCT pool_id) FROM p"
                                     ).fetchall()[0]
        if distinct < rows:
            raise MmiaError(f"{rows - distinct} pool rows repeat another row's id and URL: "
                            "de-duplicate the inputs")
        write_parquet(con, "SELECT pool_id AS id, url, caption, CAST(NULL AS VARCHAR) AS date "
                      "FROM p ORDER BY md5(? || pool_id)", out, [str(seed)])
        write_parquet(con, "SELECT pool_id AS id, member, id AS source_id, CASE member WHEN 1 "
                      "THEN 'members' ELSE 'nonmembers' END AS source FROM p ORDER BY pool_id",
                      truth)
        n_m, n_n = con.execute("SELECT (SELECT count(*) FROM m), (SELECT count(*) FROM n)"
                               ).fetchall()[0]
    result = PoolResult(members=n_m, nonmembers=n_n, rows=rows, seed=seed, output=out,
                        truth=truth)
    result.summary_path = write_summary(out, result.summary())
    return result


def _refuse_overlap(con, members: Source, nonmembers: Source) -> None:
    """A row in both inputs (same URL) would carry two labels: one line, with an example."""
    shared = con.execute("SELECT count(DISTINCT url), min(url) FROM m JOIN n USING (url)"
                         ).fetchall()[0]
    if shared[0]:
        raise MmiaError(f"{shared[0]} URLs are in both --members and --nonmembers (e.g. "
                        f"{shared[1]!r}): de-duplicate the non-members first (mmia data dedup)")
