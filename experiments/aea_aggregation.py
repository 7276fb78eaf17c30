"""Choose AEA's aggregation from pilot data: AUC of every aggregation, several worlds, several K.

For each world seed it builds (or reuses) a pilot world and its target with that seed, embeds
the evaluation splits with K views (cached), and scores every aggregation of
`mmia.attacks.aea` under both pilot protocols, then again with only the first k ≤ K views.
Seed 0 is the default pilot, so its numbers match `mmia pilot`. Prints markdown.

    python experiments/aea_aggregation.py [--root .mmia/pilot] [--seeds 0 1 2] [--views 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

from mmia.attacks import CSA
from mmia.attacks.aea import AGGREGATIONS, DEFAULT_AGGREGATION, aggregate
from mmia.audit import features_of
from mmia.cache import EmbeddingCache
from mmia.embed import embed_shards
from mmia.metrics import evaluate
from mmia.model import load_model
from mmia.pilot import PROTOCOLS
from mmia.world import TrainConfig, WorldConfig, build_pilot

K_SWEEP = (1, 2, 5, 10)


def world_scores(root: str, seed: int, views: int) -> dict[str, tuple]:
    """protocol -> (labels, view-0 cosines (n,), augmented-view cosines (n, K))."""
    pilot = build_pilot(root, WorldConfig(seed=seed), TrainConfig(seed=seed), reference=False)
    loaded = load_model(pilot.model_name, str(pilot.target_ckpt), str(pilot.model_config),
                        device="cpu")
    cache_dir = os.path.join(root, "cache")
    cache = EmbeddingCache(cache_dir, loaded.fingerprint)
    out = {}
    for protocol, (nonmembers, _) in PROTOCOLS.items():
        records, labels = [], []
        for split, label in (("eval_members", 1), (nonmembers, 0)):
            res = embed_shards(loaded, pilot.world.urls(split), cache_dir, views=views,
                               progress=False)
            records += res.records
            labels += [label] * len(res.records)
        feats = features_of(records, cache, views)
        per_view = feats.view_cosines  # cached per pair: cos(view k, caption)
        out[protocol] = (np.array(labels), CSA().score(feats), per_view)
    return out


def metric(labels, scores, name: str) -> float:
    return evaluate(labels, scores, n_bootstrap=0)[name]


def cell(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".mmia/pilot")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--views", type=int, default=10)
    args = parser.parse_args()
    start = time.perf_counter()
    scores = {s: world_scores(args.root, s, args.views) for s in args.seeds}
    names = ["csa", *AGGREGATIONS]

    def values(protocol: str, name: str, k: int, what: str = "auc") -> list[float]:
        vals = []
        for s in args.seeds:
            y, base, per_view = scores[s][protocol]
            score = base if name == "csa" else aggregate(base, per_view[:, :k], name)
            vals.append(metric(y, score, what))
        return vals

    command = " ".join(["python", "experiments/aea_aggregation.py", *sys.argv[1:]])
    print(f"Command: `{command} > experiments/results/aea_aggregation.md`")
    print(f"\nWorld seeds {args.seeds} (default pilot config, target trained with the same "
          f"seed); K = {args.views} views; eval_members vs the protocol's evaluation "
          "non-members. Cells: mean ± std over seeds. TPR@1%FPR is read off the ROC "
          "(no threshold transfer), for comparison only.\n")
    print("| aggregation | iid AUC | iid TPR@1%FPR | post-release AUC | post-release TPR@1%FPR |")
    print("|---|---|---|---|---|")
    for name in names:
        label = f"aea-{name}" if name != "csa" else "csa (reference)"
        row = [cell(values(p, name, args.views, w)) for p in PROTOCOLS
               for w in ("auc", "tpr@1%fpr")]
        print(f"| {label} | " + " | ".join(row) + " |")
    ks = [k for k in K_SWEEP if k <= args.views]
    print(f"\niid AUC by number of views k (first k of the {args.views} cached views), "
          "mean over seeds:\n")
    print("| aggregation | " + " | ".join(f"k={k}" for k in ks) + " |")
    print("|---" * (len(ks) + 1) + "|")
    for name in AGGREGATIONS:
        print(f"| aea-{name} | "
              + " | ".join(f"{np.mean(values('iid', name, k)):.3f}" for k in ks) + " |")
    print("\nAUC per world seed (iid / post-release):\n")
    print("| aggregation | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("|---" * (len(args.seeds) + 1) + "|")
    for name in names:
        iid, post = (values(p, name, args.views) for p in PROTOCOLS)
        cells = [f"{a:.3f} / {b:.3f}" for a, b in zip(iid, post, strict=True)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nCurrent default: `{DEFAULT_AGGREGATION}`. Machine: {platform.machine()}, "
          f"{os.cpu_count()} cores; {time.perf_counter() - start:.0f} s (worlds built or reused).")


if __name__ == "__main__":
    main()
