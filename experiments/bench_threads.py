"""Torch threads beside a decoding DataLoader worker: `mmia embed` throughput on the CPU.

The pilot's model architecture (mmia-tiny-vit, random init) embeds the same generated shards
(64 px JPEG, like the pilot world's) with one DataLoader worker and torch's intra-op threads set
to each value of --threads, alternating for --rounds rounds; prints samples/s per setting and the
default mmia picks (`mmia.encode.torch_threads`: the cores the workers leave).

    python experiments/bench_threads.py                    # threads 1 and 2, 3 rounds
    python experiments/bench_threads.py --busy 1           # beside one other busy process

Last line: `threads1_samples_s=… threads2_samples_s=… default_threads=…`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from mmia.embed import embed_shards
from mmia.encode import torch_threads
from mmia.model import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import write_shards  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "mmia/world/configs/mmia-tiny-vit.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--busy", type=int, default=0,
                        help="other processes spinning on the CPU meanwhile (a shared machine)")
    args = parser.parse_args()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.busy)]
    try:
        run(args)
    finally:
        for hog in hogs:
            hog.kill()


def run(args: argparse.Namespace) -> None:
    loaded = load_model("mmia-tiny-vit", model_config=str(CONFIG), device="cpu")
    rates: dict[int, list[float]] = {t: [] for t in args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_shards(tmp, args.samples, 250, 64)
        for r in range(args.rounds):
            for threads in args.threads:
                result = embed_shards(loaded, [pattern], os.path.join(tmp, f"c-{r}-{threads}"),
                                      batch_size=100, workers=args.workers, threads=threads,
                                      progress=False)
                rates[threads].append(len(result.records) / result.seconds)
                print(f"round {r + 1}, threads {threads}: {rates[threads][-1]:.0f} samples/s",
                      flush=True)
    default = torch_threads(args.workers, None)
    print(f"machine: {os.cpu_count()} cores; {args.samples} samples, {args.workers} worker(s), "
          f"{args.busy} other busy process(es); mmia's default here: {default} thread(s)")
    print(" ".join(f"threads{t}_samples_s={float(np.median(v)):.0f}" for t, v in rates.items())
          + f" default_threads={default}")


if __name__ == "__main__":
    main()
