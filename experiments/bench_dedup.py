"""Benchmark: `mmia data dedup` (DuckDB, streaming) on 10^7 training rows against 10^6 candidates.

Generates LAION-like metadata as Parquet with DuckDB (in chunks of 10^6 rows, never in Python
lists): training rows `URL, TEXT`; candidates `url, caption`, of which 3 % repeat a training URL,
3 % a training caption up to case, digits, punctuation and stopwords, 1 % both, the rest fresh.
Then times the de-duplication — in a child process, so that its peak RSS is its own — twice:
against the first 10^6 training rows and against all of them. Time is linear in the training
rows (one scan for URLs, one for captions; the candidates are the hash table), so the two runs
give T(N) = a + b·N and the extrapolation to LAION-400M's 4·10^8 rows. Target on 2 cores:
≤ 5 min and ≤ 4 GB peak RSS for 10^7 rows. The last line is key=value pairs.

    python experiments/bench_dedup.py [--train-rows 10000000] [--candidates 1000000]
        [--threads 2] [--memory-limit 2GB] [--folder DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

CHUNK = 1_000_000
LAION_ROWS = 400_000_000

# One pseudo-word (4–8 letters, no digits) per integer; a caption is six of them.
MACROS = """
CREATE OR REPLACE MACRO word(x) AS
  translate(substr(md5(CAST(x AS VARCHAR)), 1, 4 + CAST(x % 5 AS INTEGER)), '0123456789',
            'ghijklmnop');
CREATE OR REPLACE MACRO words(i, salt) AS
  array_to_string(list_transform(range(6), lambda j: word(hash(i, j, salt) % 50000)), ' ');
CREATE OR REPLACE MACRO train_url(t) AS
  'https://img' || CAST(t % 97 AS VARCHAR) || '.example.com/' || md5(CAST(t AS VARCHAR)) || '.jpg';
CREATE OR REPLACE MACRO train_caption(t) AS
  'Photo of ' || words(t, 0) || ', ' || CAST(t % 1000 AS VARCHAR) || '!';
"""


def generate(folder: str, train_rows: int, candidates: int) -> dict:
    """Training chunks train-NNN.parquet and candidates.parquet; returns the expected counts."""
    import duckdb

    con = duckdb.connect(config={"threads": 2, "memory_limit": "2GB",
                                 "preserve_insertion_order": False})
    con.execute(MACROS)
    for c, start in enumerate(range(0, train_rows, CHUNK)):
        stop = min(train_rows, start + CHUNK)
        path = os.path.join(folder, f"train-{c:03d}.parquet")
        con.execute(f"COPY (SELECT train_url(i) AS URL, train_caption(i) AS TEXT, "
                    f"0.3 AS similarity FROM range({start}, {stop}) r(i)) TO '{path}' "
                    f"(FORMAT parquet, COMPRESSION zstd)").fetchall()
    # candidate j points at training row t(j); j % 100 picks its kind
    con.execute(f"""COPY (SELECT
        CASE WHEN k < 3 OR k = 6 THEN train_url(t)
             ELSE 'https://cand.example.org/' || md5('c' || CAST(j AS VARCHAR)) || '.png' END
          AS url,
        CASE WHEN k BETWEEN 3 AND 6 THEN 'PHOTO OF THE ' || upper(words(t, 0)) || ' -- '
                                         || CAST(j % 777 AS VARCHAR) || '?'
             ELSE 'Picture with ' || words(j, 1) || ' and the ' || CAST(j AS VARCHAR) END
          AS caption
        FROM (SELECT j, j % 100 AS k, (j * 7919) % {train_rows} AS t
              FROM range({candidates}) r(j)))
        TO '{os.path.join(folder, "candidates.parquet")}' (FORMAT parquet, COMPRESSION zstd)
        """).fetchall()
    con.close()
    per_hundred = {"url": 4, "caption": 3}  # k in {0,1,2,6} by URL, {3,4,5} by caption
    full, rest = divmod(candidates, 100)
    expected = {kind: full * n + sum(1 for k in range(rest) if _kind(k) == kind)
                for kind, n in per_hundred.items()}
    expected["kept"] = candidates - expected["url"] - expected["caption"]
    return expected


def _kind(k: int) -> str:
    return "url" if k < 3 or k == 6 else "caption" if k < 6 else "kept"


def run_dedup(folder: str, train_files: int, threads: int, memory_limit: str) -> dict:
    """The measured run (child process): mmia's dedup through its Python API."""
    from mmia.data import Engine, Source, dedup
    from mmia.data.metadata import PRESETS

    train = Source(tuple(os.path.join(folder, f"train-{c:03d}.parquet")
                         for c in range(train_files)), PRESETS["laion"])
    out = os.path.join(folder, f"kept-{train_files}.parquet")
    start = time.perf_counter()
    result = dedup(Source((os.path.join(folder, "candidates.parquet"),)), train, out,
                   Engine(threads=threads, memory_limit=memory_limit))
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return {"seconds": seconds, "rows": result.rows, "training_rows": result.training_rows,
            "url": result.dropped_url, "caption": result.dropped_caption, "kept": result.kept,
            "peak_rss_gib": peak_kib / 2**20}


def measure(folder: str, train_files: int, args: argparse.Namespace) -> dict:
    """Run the dedup in a fresh child process; its time, counts and peak RSS (GiB)."""
    out = subprocess.run([sys.executable, __file__, "--child", folder, str(train_files),
                          str(args.threads), args.memory_limit],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-rows", type=int, default=10_000_000)
    p.add_argument("--candidates", type=int, default=1_000_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-limit", default="2GB")
    p.add_argument("--folder", help="where to generate (default: a temporary folder)")
    args = p.parse_args()
    import duckdb

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; python "
          f"{platform.python_version()}, duckdb {duckdb.__version__}; threads {args.threads}, "
          f"memory_limit {args.memory_limit}")
    with tempfile.TemporaryDirectory(prefix="bench-dedup-", dir=args.folder) as folder:
        start = time.perf_counter()
        expected = generate(folder, args.train_rows, args.candidates)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        print(f"generated {args.train_rows} training rows ({-(-args.train_rows // CHUNK)} "
              f"Parquet files) and {args.candidates} candidates in "
              f"{time.perf_counter() - start:.0f} s, {size / 2**30:.2f} GiB on disk")
        n_files = -(-args.train_rows // CHUNK)
        runs = [measure(folder, 1, args)] if n_files > 1 else []
        runs.append(measure(folder, n_files, args))
    for r in runs:
        print(f"dedup {r['rows']} candidates against {r['training_rows']} training rows: "
              f"{r['seconds']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB; dropped by URL "
              f"{r['url']}, by caption {r['caption']}, kept {r['kept']}")
    full = runs[-1]
    ok = all(full[k] == v for k, v in expected.items())
    print(f"expected by URL {expected['url']}, by caption {expected['caption']}, kept "
          f"{expected['kept']}: {'match' if ok else 'MISMATCH'}")
    if len(runs) == 2:
        small = runs[0]
        slope = (full["seconds"] - small["seconds"]) / (full["training_rows"]
                                                         - small["training_rows"])
        base = full["seconds"] - slope * full["training_rows"]
        laion = base + slope * LAION_ROWS
    else:
        laion = full["seconds"] * LAION_ROWS / full["training_rows"]
    print(f"extrapolated to {LAION_ROWS:,} training rows (linear in training rows, same "
          f"candidates): {laion / 60:.0f} min; memory does not grow with the training rows")
    print(f"train_rows={full['training_rows']} candidates={full['rows']} "
          f"seconds={full['seconds']:.1f} peak_rss_gib={full['peak_rss_gib']:.2f} "
          f"laion400m_minutes={laion / 60:.0f} counts_match={ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        print(json.dumps(run_dedup(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                   sys.argv[5])))
        sys.exit(0)
    sys.exit(main())
