"""Choose AEA's aggregation from pilot data: AUC of every aggregation under both protocols.

Reuses the pilot world, target and embedding cache that `mmia pilot` builds (embeds what is
missing). Prints a markdown table.

    python experiments/aea_aggregation.py [--root .mmia/pilot] [--views 10]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from sklearn.metrics import roc_auc_score

from mmia.attacks import AEA, CSA
from mmia.attacks.aea import AGGREGATIONS
from mmia.audit import features_of
from mmia.cache import EmbeddingCache
from mmia.embed import embed_shards
from mmia.model import load_model
from mmia.pilot import PROTOCOLS
from mmia.world import build_pilot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".mmia/pilot")
    parser.add_argument("--views", type=int, default=10)
    args = parser.parse_args()
    pilot = build_pilot(args.root, reference=False)
    loaded = load_model(pilot.model_name, str(pilot.target_ckpt), str(pilot.model_config),
                        device="cpu")
    cache_dir = os.path.join(args.root, "cache")
    cache = EmbeddingCache(cache_dir, loaded.fingerprint)
    names = ["csa", *(f"aea-{a}" for a in AGGREGATIONS)]
    lines = ["| protocol | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for protocol, (nonmembers, _) in PROTOCOLS.items():
        records, labels = [], []
        for split, label in (("eval_members", 1), (nonmembers, 0)):
            res = embed_shards(loaded, pilot.world.urls(split), cache_dir, views=args.views,
                               progress=False)
            records += res.records
            labels += [label] * len(res.records)
        feats = features_of(records, cache, args.views)
        scores = [CSA().score(feats)] + [AEA(aggregation=a).score(feats) for a in AGGREGATIONS]
        aucs = [roc_auc_score(np.array(labels), s) for s in scores]
        lines.append(f"| {protocol} | " + " | ".join(f"{a:.3f}" for a in aucs) + " |")
    print(f"AEA aggregations on the pilot world, K = {args.views} views; AUC "
          "(eval_members vs the protocol's evaluation non-members)\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
