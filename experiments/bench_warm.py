"""Cold vs warm `mmia audit` (csa, aea with K = 10, wsa, blind) on generated worlds.

Two settings, each run as a user runs it (a child process, wall time from start to exit):
- tiny: the pilot's model architecture (mmia-tiny-vit, random init) on a world of 4,000 audit
  samples (1,000 each of members, non-members, known non-members, pool);
- vitb32: open_clip ViT-B-32 (random init: no weights can be downloaded here) on 256 samples
  (64 of each role).
The cold run starts from an empty cache; the warm run repeats the same command, which finds every
shard in the sample index and every feature in the cache, so it reads no tar, decodes no image,
builds no model and imports no torch.

    python experiments/bench_warm.py                 # both settings (ViT-B-32 cold: minutes)
    python experiments/bench_warm.py --only tiny

Targets (issue 13): warm/cold ≤ 0.10 (tiny) and ≤ 0.02 (vitb32). Last line:
`warm_over_cold_tiny=… warm_over_cold_vitb32=…`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from mmia.world import WorldConfig, make_world

TINY_CONFIG = Path(__file__).resolve().parents[1] / "mmia/world/configs/mmia-tiny-vit.json"
SETTINGS = {
    "tiny": (1000, ["--model", "mmia-tiny-vit", "--model-config", str(TINY_CONFIG)]),
    "vitb32": (64, ["--model", "ViT-B-32"]),
}
ROLES = {"--members": "eval_members", "--nonmembers": "eval_nonmembers",
         "--known-nonmembers": "known_nonmembers", "--pool": "pool"}


def world(root: Path, per_role: int) -> dict[str, list[str]]:
    """A generated world with `per_role` samples in each audit role; its shards by flag."""
    cfg = replace(WorldConfig(), n_members=2 * per_role, n_eval=per_role,
                  n_known_nonmembers=per_role, n_pool_members=per_role // 2,
                  n_pool_nonmembers=per_role - per_role // 2, n_reference=2, n_post_release=2,
                  n_post_release_known=2)
    w = make_world(root, cfg)
    return {flag: [str(p) for p in w.shards(split)] for flag, split in ROLES.items()}


def audit(model_args: list[str], shards: dict[str, list[str]], cache: Path,
          out: Path) -> float:
    args = [sys.executable, "-m", "mmia", "audit", *model_args, "--device", "cpu",
            "--attacks", "csa,aea,wsa,blind", "--views", "10", "--cache", str(cache),
            "--out", str(out), "--no-progress"]
    for flag, paths in shards.items():
        args += [flag, *paths]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"mmia audit failed:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SETTINGS), action="append")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mmia-bench-warm-"))
    ratios = {}
    try:
        for name in args.only or list(SETTINGS):
            per_role, model_args = SETTINGS[name]
            shards = world(root / name / "world", per_role)
            cold = audit(model_args, shards, root / name / "cache", root / name / "cold")
            warm = audit(model_args, shards, root / name / "cache", root / name / "warm")
            ratios[name] = warm / cold
            print(f"{name}: {4 * per_role} samples, cold {cold:.1f} s, warm {warm:.2f} s, "
                  f"warm/cold {warm / cold:.3f}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"machine: {os.cpu_count()} cores, CPU only")
    print(" ".join(f"warm_over_cold_{n}={r:.3f}" for n, r in ratios.items()))


if __name__ == "__main__":
    main()
