"""Micro-benchmark of everything downstream of the features at audit scale.

Random unit features (d = 512) for N evaluation samples, 10^4 known non-members and 10^4 pool
samples; synthetic captions of 6-14 words from a vocabulary of 3,000 (members' words slightly
tilted); random image statistics. Features reach CSA, AEA and WSA in blocks, as a blocked
audit hands them over. Generation is not timed. Prints per component wall and CPU seconds and
the process's peak RSS during it (VmHWM, reset before each component), then one line of
key=value pairs.

    python experiments/bench_attacks.py --n 1000000
"""

from __future__ import annotations

import argparse
import io
import resource
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mmia.attacks import AEA, CSA, WSA, Blind, Features
from mmia.metrics import evaluate
from mmia.report import write_outputs

D = 512
VOCAB = 3000


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def peak_rss_gb() -> float:
    """VmHWM: the peak resident set since the last `reset_peak` (or process start)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


FIGURES: dict[str, tuple[float, float, float]] = {}


@contextmanager
def timed(name: str):
    reset_peak()
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    FIGURES[name] = (time.perf_counter() - wall, time.process_time() - cpu, peak_rss_gb())
    print(f"{name:>14}: {FIGURES[name][0]:7.2f} s wall {FIGURES[name][1]:7.2f} s cpu "
          f"peak RSS {FIGURES[name][2]:.2f} GB", flush=True)


def features(n: int, rng: np.random.Generator, close: np.ndarray | None = None) -> Features:
    """n random unit image/text pairs; rows where `close` is True get text near the image."""
    image = unit(rng.standard_normal((n, D), dtype=np.float32))
    text = unit(rng.standard_normal((n, D), dtype=np.float32))
    if close is not None:
        text[close] = unit(image[close] + 0.8 * text[close])
    return Features(keys=[f"x{i}" for i in range(n)], image=image, text=text)


def captions(y: np.ndarray, rng: np.random.Generator) -> list[str]:
    words = np.array([f"word{i}" for i in range(VOCAB)])
    p0 = 1.0 / np.arange(1, VOCAB + 1)
    p0 /= p0.sum()
    p1 = p0 * np.exp(0.1 * rng.normal(size=VOCAB))
    p1 /= p1.sum()
    lengths = rng.integers(6, 15, size=len(y))
    tokens = np.where(y[:, None] == 1, rng.choice(VOCAB, (len(y), 14), p=p1),
                      rng.choice(VOCAB, (len(y), 14), p=p0))
    return [" ".join(words[t[:m]]) for t, m in zip(tokens, lengths, strict=True)]


def block_features(base: Features, start: int, stop: int) -> Features:
    """Evaluation rows start..stop: the first stop - start rows of the base block (no copy;
    every block repeats the base's vectors, which costs the attacks the same)."""
    m = stop - start
    return Features(keys=base.keys[:m], image=base.image[:m], text=base.text[:m])


def jpeg(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (seed % 256, 90, 160)).save(buf, format="JPEG")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--known", type=int, default=10_000)
    ap.add_argument("--pool", type=int, default=10_000)
    ap.add_argument("--block", type=int, default=65_536, help="rows per image/text block")
    ap.add_argument("--view-block", type=int, default=8_192,
                    help="rows per AEA views block (K x d floats a row)")
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()
    n, rng = args.n, np.random.default_rng(0)

    print(f"generating n={n} ...", flush=True)
    y = (rng.random(n) < 0.5).astype(np.int64)
    base = features(min(args.block, n), rng)
    view_base = unit(base.image[:min(args.view_block, n), None, :]
                     + 0.3 * rng.standard_normal((min(args.view_block, n), args.views, D),
                                                 dtype=np.float32))
    known = features(args.known, rng)
    pool = features(args.pool, rng, close=rng.random(args.pool) < 0.3)
    caps = captions(y, rng)
    groups = [f"{i:064x}" for i in range(n)]
    stats = rng.random((n, 10), dtype=np.float32)
    empty = np.empty((n, 0), np.float32)
    blind_input = Features(keys=groups, image=empty, text=empty, captions=caps, groups=groups,
                           image_stats=stats)
    scores: dict[str, np.ndarray] = {}
    calibration: dict[str, np.ndarray] = {}
    print(f"inputs ready, peak RSS so far {peak_rss_gb():.2f} GB", flush=True)

    def blocked(score_block, step: int) -> np.ndarray:
        return np.concatenate([score_block(s, min(s + step, n)) for s in range(0, n, step)])

    with timed("csa"):
        csa = CSA()
        scores["csa"] = blocked(lambda a, b: csa.score(block_features(base, a, b)), args.block)
        calibration["csa"] = csa.score(known)
    with timed("aea"):
        aea = AEA()

        def aea_block(a: int, b: int) -> np.ndarray:
            f = block_features(base, a, b)
            f.views = view_base[:b - a]
            return aea.score(f)

        scores["aea"] = blocked(aea_block, args.view_block)
        calibration["aea"] = aea.score(Features(keys=known.keys, image=known.image,
                                                text=known.text,
                                                views=np.repeat(known.image[:, None],
                                                                args.views, axis=1)))
    with timed("wsa_fit"):
        fit_known, cal_known = known.subset(np.arange(args.known // 2)), \
            known.subset(np.arange(args.known // 2, args.known))
        wsa = WSA(seed=0).fit(fit_known, pool)
    with timed("wsa_score"):
        scores["wsa"] = blocked(lambda a, b: wsa.score(block_features(base, a, b)), args.block)
        calibration["wsa"] = wsa.score(cal_known)
    with timed("blind_cv"):
        scores["blind"] = Blind().cross_val_scores(blind_input, y, seed=0)
    with timed("evaluate"):
        results = {name: evaluate(y, s, calibration.get(name), n_bootstrap=args.bootstrap)
                   for name, s in scores.items()}
    loads: list[list[int]] = []

    def loader(rows: list[int]) -> list[bytes]:
        loads.append(rows)
        return [jpeg(r) for r in rows]

    with timed("write_outputs"), tempfile.TemporaryDirectory() as out:
        write_outputs(out, results, scores, y, groups, {"command": "bench_attacks"},
                      samples={"captions": caps, "image_loader": loader})
        csv_mb = (Path(out) / "scores.csv").stat().st_size / 2**20
    total_wall = sum(v[0] for v in FIGURES.values())
    total_cpu = sum(v[1] for v in FIGURES.values())
    peak = max(v[2] for v in FIGURES.values())
    print(f"scores.csv {csv_mb:.0f} MB; image_loader calls {len(loads)} "
          f"({len(loads[0]) if loads else 0} rows); AUCs "
          + " ".join(f"{k}={r['auc']:.3f}" for k, r in results.items()))
    print(f"n={n} " + " ".join(f"{k}_s={v[0]:.2f}" for k, v in FIGURES.items())
          + f" total_s={total_wall:.2f} total_cpu_s={total_cpu:.2f} peak_rss_gb={peak:.2f}")


if __name__ == "__main__":
    main()
