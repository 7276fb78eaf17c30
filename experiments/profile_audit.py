"""Where a warm `mmia audit` spends its time: bench_scale's audit, run in this process under
cProfile, by phase.

    python experiments/bench_scale.py --n 1000000 --root /tmp/scale   # builds and keeps the cache
    python experiments/profile_audit.py --root /tmp/scale

Prints each phase's cumulative seconds (the profiler adds a few percent) and the wall time;
the phases nest where one calls another (reading features happens inside scoring).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

ROLES = (("members", "--members"), ("nonmembers", "--nonmembers"),
         ("known_nonmembers", "--known-nonmembers"), ("pool", "--pool"))
# phase: (file path suffix, function name)
PHASES = {
    "imports and argument parsing": ("mmia/cli.py", "build_parser"),
    "warm check: sample index, cache index, lookups": ("mmia/embed.py", "embed_shards"),
    "role overlap checks": ("mmia/audit.py", "check_roles_disjoint"),
    "WSA: fitting the MLP": ("mmia/attacks/wsa.py", "fit"),
    "WSA: scoring": ("mmia/attacks/wsa.py", "score"),
    "blind baseline (cross-validation)": ("mmia/attacks/blind.py", "cross_val_scores"),
    "reading evaluation features (in scoring)": ("mmia/audit.py", "blocks"),
    "metrics (intervals)": ("mmia/audit.py", "attack_metrics"),
    "outputs: metrics.json, scores.csv, roc.png, report.html": ("mmia/report.py",
                                                                "write_outputs"),
}


def audit_args(root: Path, out: Path) -> list[str]:
    """The audit bench_scale times, over the shards of its --root."""
    shards = root / "big" / "shards"
    args = ["audit", "--model", "ViT-B-32", "--device", "cpu", "--attacks", "csa,aea,wsa,blind",
            "--views", "10", "--cache", str(root / "big" / "cache"), "--out", str(out),
            "--no-progress"]
    for role, flag in ROLES:
        urls = sorted(str(p) for p in (shards / role).glob("*.tar"))
        if not urls:
            sys.exit(f"no shards in {shards / role}: run bench_scale.py --root {root} first")
        args += [flag, *urls]
    return args


def phase_seconds(stats: pstats.Stats) -> dict[str, float]:
    found = dict.fromkeys(PHASES, 0.0)
    for (filename, _, function), (_, _, _, cumulative, _) in stats.stats.items():
        for phase, (suffix, name) in PHASES.items():
            if function == name and filename.endswith(suffix):
                found[phase] += cumulative
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="a bench_scale.py --root folder")
    args = parser.parse_args()
    root = Path(args.root)
    from mmia.cli import main as mmia_main

    profile = cProfile.Profile()
    start = time.perf_counter()
    rc = profile.runcall(mmia_main, audit_args(root, root / "profile-out"))
    wall = time.perf_counter() - start
    if rc:
        sys.exit(f"mmia audit exited with {rc}")
    for phase, seconds in phase_seconds(pstats.Stats(profile)).items():
        print(f"{seconds:6.1f} s  {phase}")
    print(f"{wall:6.1f} s  wall, under the profiler")


if __name__ == "__main__":
    main()
