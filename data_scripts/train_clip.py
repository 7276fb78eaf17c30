"""Train a small open_clip CLIP on webdataset shards (CPU) and save a checkpoint."""

from __future__ import annotations

import argparse

from mmia.world import DEFAULT_MODEL_CONFIG, TrainConfig, train_clip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("shards", nargs="+", help="shard directory, glob, or tar paths")
    ap.add_argument("--out", required=True, help="checkpoint path (.pt)")
    ap.add_argument("--model-config", default=str(DEFAULT_MODEL_CONFIG))
    d = TrainConfig()
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
    ap.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    ap.add_argument("--augment", action="store_true")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    cfg = TrainConfig(seed=a.seed, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                      weight_decay=a.weight_decay, warmup_steps=a.warmup_steps,
                      augment=a.augment, max_steps=a.max_steps, threads=a.threads)
    shards = a.shards[0] if len(a.shards) == 1 else a.shards
    res = train_clip(shards, a.model_config, a.out, cfg)
    print(f"saved {res.checkpoint} ({res.model_name}) in {res.seconds:.1f}s; "
          f"loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f}")


if __name__ == "__main__":
    main()
