"""Write a synthetic LAION-shaped pilot world (img2dataset webdataset shards + ground truth)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from mmia.world import WorldConfig, make_world


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir")
    for f in fields(WorldConfig):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = ap.parse_args(argv)
    cfg = WorldConfig(**{f.name: getattr(args, f.name) for f in fields(WorldConfig)})
    world = make_world(args.out_dir, cfg)
    for split, keys in world.keys.items():
        print(f"{split:18s} {len(keys):6d} samples  {world.split_dir(split)}")
    print(f"ground truth: {world.ground_truth}")


if __name__ == "__main__":
    main()
