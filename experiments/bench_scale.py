"""Warm `mmia audit` at scale: N evaluation samples + 10^4 known non-members + 10^4 pool.

Builds (untimed) a warm cache and sample index through mmia's own APIs: random unit features
(d = 512, ViT-B-32's width) for every image and caption, the K = 10 augmented-view cosines of
every pair, a sample index per shard (10^4 samples per shard file; the shard files are empty
placeholders whose identity the index records) and the model's fingerprint memo. Then times,
in a child process, exactly what a user runs on a warm cache:

    mmia audit --model ViT-B-32 --members … --nonmembers … --known-nonmembers … --pool …
               --attacks csa,aea,wsa,blind --views 10 --cache … --out …

and reports its wall time and peak RSS, plus the cost per sample of looking features up in a
cache of N samples against one of 10^4 (10^4 lookups in each store an audit reads, the two caches
measured in alternating rounds).

The audit runs twice. The first (`audit_first_s`) finds no verification marks (the bench removes
them: as after an `mmia embed` that never read its features back), so it hashes every feature
file it reads, 4 GB at 10^6, and marks them; the second (`audit_s`) is the warm re-audit, which
finds the files it reads marked by the first and unchanged.

    python experiments/bench_scale.py --n 1000000       # targets: audit_s ≤ 60, peak_rss_gb ≤ 2
    python experiments/bench_scale.py --n 10000         # quick check

Last line: `n=… lookup_us_per_sample=… lookup_ratio_vs_1e4=… audit_s=… peak_rss_gb=…
audit_first_s=…`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from mmia.cache import VERIFIED, EmbeddingCache, FeatureStore, pair_digests
from mmia.modelref import MEMO_FOLDER, LazyModel, ModelRequest
from mmia.sample_index import N_STATS, SAMPLE, SCHEMA, SampleIndex, SampleTable, shard_identity
from mmia.shards import shard_labels

DIM, VIEWS, PER_SHARD, WRITE_ROWS = 512, 10, 10_000, 65_536
REQUEST = ModelRequest("ViT-B-32", device="cpu")
WORDS = np.array([f"w{i}" for i in range(3000)], dtype=object)


def unit(rng: np.random.Generator, n: int, d: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def digests(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random 32-hex-character content digests ("S32")."""
    raw = rng.integers(0, 16, (n, 32), dtype=np.uint8)
    chars = np.frombuffer(b"0123456789abcdef", np.uint8)[raw]
    return chars.view("S32").reshape(n)


def captions(rng: np.random.Generator, n: int) -> np.ndarray:
    words = WORDS[rng.integers(0, len(WORDS), (n, 10))]
    return np.array([" ".join(row) for row in words], dtype=object)


def write_role(root: Path, cache: EmbeddingCache, index: SampleIndex, role: str, n: int,
               rng: np.random.Generator, views: int) -> list[str]:
    """Placeholder shards, their sample index and the features of `n` samples of one role."""
    folder = root / "shards" / role
    folder.mkdir(parents=True)
    urls = []
    for s in range(0, n, PER_SHARD):
        path = folder / f"{s // PER_SHARD:05d}.tar"
        path.write_bytes(b"")
        urls.append(str(path))
    labels = shard_labels(urls)
    for i, url in enumerate(urls):
        m = min(PER_SHARD, n - i * PER_SHARD)
        img, cap = digests(rng, m), digests(rng, m)
        table = pa.table({
            "kind": pa.array(np.full(m, SAMPLE, np.int8)),
            "key": pa.array([f"{labels[url]}/{j:06d}" for j in range(m)]),
            "reason": pa.nulls(m, pa.string()), "detail": pa.nulls(m, pa.string()),
            "image_digest": pa.array(img.astype(str)), "caption_digest": pa.array(cap.astype(str)),
            "pair_digest": pa.array(pair_digests(img, cap).astype(str)),
            "caption": pa.array(captions(rng, m), pa.string()),
            "source_url": pa.nulls(m, pa.string()),
            "stats": pa.FixedSizeListArray.from_arrays(
                pa.array(rng.random(m * N_STATS, dtype=np.float32)), N_STATS),
        }, schema=SCHEMA)
        index.write(url, shard_identity(url), labels[url], table)
        cache.image(0).write_new(img, unit(rng, m))
        cache.text.write_new(cap, unit(rng, m))
        if views:
            cache.pairs(views).write_new(pair_digests(img, cap),
                                         rng.uniform(-0.2, 0.4, (m, views)).astype(np.float32))
    return urls


def write_memo(cache_root: str, fingerprint: str) -> None:
    """The fingerprint memo a previous (cold) run would have left: no model is built."""
    path = Path(cache_root) / MEMO_FOLDER / f"{REQUEST.memo_key()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fingerprint": fingerprint,
                                "description": {"name": "ViT-B-32", "bench": True}}))


def build(root: Path, n: int, known: int, pool: int, seed: int) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed)
    cache_root = str(root / "cache")
    fingerprint = "bench" + "0" * 11
    cache = EmbeddingCache(cache_root, fingerprint)
    index = SampleIndex(cache_root)
    sizes = {"members": n // 2, "nonmembers": n - n // 2, "known_nonmembers": known, "pool": pool}
    urls = {role: write_role(root, cache, index, role, m, rng, 0 if role == "pool" else VIEWS)
            for role, m in sizes.items()}
    write_memo(cache_root, fingerprint)
    assert LazyModel(REQUEST, cache_root).fingerprint == fingerprint
    return urls


def lookup_queries(cache_root: str, urls: list[str], rows: int, seed: int) -> list:
    """(store, digests) for every store an audit reads (image, caption, K cosines), each store
    opened afresh as a new audit process opens it: `rows` samples, half of them cached and half
    absent, in random order (what `embed` asks per chunk and the warm check per shard)."""
    index = SampleIndex(cache_root)
    labels = shard_labels(urls)
    table = SampleTable.from_shards([(u, index.load(u, shard_identity(u), labels[u]))
                                     for u in urls])
    cache = EmbeddingCache(cache_root, LazyModel(REQUEST, cache_root).fingerprint)
    rng = np.random.default_rng([seed, 7])  # not the stream the cache's digests came from
    pick = rng.choice(len(table), rows // 2, replace=False)
    absent = digests(rng, rows - rows // 2)
    queries = [(FeatureStore(cache.image(0).folder).refresh(),
                np.r_[table.image_digest[pick], absent]),
               (FeatureStore(cache.text.folder).refresh(),
                np.r_[table.caption_digest[pick], absent]),
               (FeatureStore(cache.pairs(VIEWS).folder).refresh(),
                np.r_[table.pair_digest[pick], absent])]
    for store, query in queries:  # first touch: verification of the segments it hits
        found = int(store.contains(query).sum())
        assert found == rows // 2, (store.folder, found)
    return queries


def lookup_seconds(queries: list) -> float:
    start = time.perf_counter()
    for store, query in queries:
        store.contains(query)
    return time.perf_counter() - start


def lookup_us(big: list, small: list, rows: int, rounds: int = 9) -> tuple[float, float, float]:
    """µs per sample in the big and the small cache, and their ratio: rounds alternate between
    the two (so a machine that slows down meanwhile slows both), medians over the rounds."""
    times = np.array([(lookup_seconds(big), lookup_seconds(small)) for _ in range(rounds)])
    big_us, small_us = np.median(times, axis=0) / rows * 1e6
    return float(big_us), float(small_us), float(np.median(times[:, 0] / times[:, 1]))


def run_audit(root: Path, urls: dict[str, list[str]]) -> tuple[float, float, str]:
    """Wall seconds and peak RSS (GB) of the warm `mmia audit` child process."""
    args = [sys.executable, "-m", "mmia", "audit", "--model", REQUEST.name, "--device", "cpu",
            "--attacks", "csa,aea,wsa,blind", "--views", str(VIEWS), "--cache",
            str(root / "cache"), "--out", str(root / "out"), "--no-progress"]
    for role, flag in (("members", "--members"), ("nonmembers", "--nonmembers"),
                       ("known_nonmembers", "--known-nonmembers"), ("pool", "--pool")):
        args += [flag, *urls[role]]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"mmia audit failed:\n{done.stderr[-3000:]}")
    rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return seconds, rss_gb, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="evaluation samples")
    parser.add_argument("--known", type=int, default=10_000)
    parser.add_argument("--pool", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", help="work folder (default: a temporary one, removed)")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="mmia-bench-scale-"))
    try:
        start = time.perf_counter()
        urls = build(root / "big", args.n, args.known, args.pool, args.seed)
        small = build(root / "small", 10_000, 1_000, 1_000, args.seed + 1)
        print(f"built warm caches in {time.perf_counter() - start:.0f} s", flush=True)
        rows = min(10_000, args.n)  # the same number of lookups in both caches
        big_us, small_us, ratio = lookup_us(
            lookup_queries(str(root / "big" / "cache"), urls["members"] + urls["nonmembers"],
                           rows, args.seed),
            lookup_queries(str(root / "small" / "cache"), small["members"] + small["nonmembers"],
                           rows, args.seed), rows)
        for marks in (root / "big" / "cache").rglob(VERIFIED):
            shutil.rmtree(marks)
        first_seconds, _, _ = run_audit(root / "big", urls)
        seconds, rss_gb, stdout = run_audit(root / "big", urls)
        print(stdout)
        print(f"machine: {os.cpu_count()} cores; {args.n} evaluation samples, {args.known} known "
              f"non-members, {args.pool} pool, d={DIM}, K={VIEWS}")
        print(f"warm audit {seconds:.1f} s; the first audit, which hashed every feature file it "
              f"read (no verification marks yet), {first_seconds:.1f} s")
        print(f"index lookups (image, caption, cosines; half absent; medians of 9 alternating "
              f"rounds): {big_us:.2f} µs/sample at n={args.n}, {small_us:.2f} at n=10^4")
        print(f"n={args.n} lookup_us_per_sample={big_us:.2f} "
              f"lookup_ratio_vs_1e4={ratio:.2f} audit_s={seconds:.1f} "
              f"peak_rss_gb={rss_gb:.2f} audit_first_s={first_seconds:.1f}")
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
