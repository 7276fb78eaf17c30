"""CSA AUC of the pilot target vs (n_members, epochs).

Run:  python experiments/world_auc_table.py [--out experiments/results/world_auc_table.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from mmia.world import (
    DEFAULT_MODEL_CONFIG,
    TrainConfig,
    WorldConfig,
    csa_auc,
    make_world,
    train_clip,
)

GRID_MEMBERS = (500, 1000, 2000)
GRID_EPOCHS = (5, 10, 15)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    command = " ".join(["python", "experiments/world_auc_table.py", *sys.argv[1:]])
    lines = [f"Command: `{command}`",
             "", "CSA AUC (eval_members vs eval_nonmembers, cosine of image/text features);",
             f"other settings: WorldConfig() and TrainConfig() defaults, "
             f"model `{DEFAULT_MODEL_CONFIG.stem}`.", "",
             "| n_members | " + " | ".join(f"epochs={e}" for e in GRID_EPOCHS) + " |",
             "|---|" + "---|" * len(GRID_EPOCHS)]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for n in GRID_MEMBERS:
            n_eval = min(300, n // 2)
            wcfg = WorldConfig(n_members=n, n_eval=n_eval, n_pool_members=min(150, n - n_eval),
                               n_reference=10, n_known_nonmembers=10, n_pool_nonmembers=10,
                               n_post_release=10, n_post_release_known=10)
            world = make_world(Path(tmp) / f"w{n}", wcfg)
            cells = []
            for e in GRID_EPOCHS:
                ck = Path(tmp) / f"t{n}_{e}.pt"
                tcfg = TrainConfig(epochs=e)
                train_clip(world.split_dir("train"), DEFAULT_MODEL_CONFIG, ck, tcfg)
                auc = csa_auc(ck, world.split_dir("eval_members"),
                              world.split_dir("eval_nonmembers"))
                default = (n, e) == (WorldConfig().n_members, TrainConfig().epochs)
                cells.append(f"**{auc:.3f}** (default)" if default else f"{auc:.3f}")
                print(f"n_members={n} epochs={e} auc={auc:.3f} ({time.time() - t0:.0f}s)",
                      file=sys.stderr, flush=True)
            lines.append(f"| {n} (n_eval={n_eval}) | " + " | ".join(cells) + " |")
    lines += ["", f"Total time: {time.time() - t0:.0f}s on this machine."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
