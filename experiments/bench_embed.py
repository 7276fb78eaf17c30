"""Benchmark: end-to-end `mmia embed` throughput vs bare open_clip encoding, in one run.

Both passes use the same shards and the same model (ViT-B-32, random init: no download).
The bare pass encodes pre-decoded, pre-processed tensors and pre-tokenised captions; the
end-to-end pass reads the shards, decodes, preprocesses, encodes and commits to a fresh cache
with default settings. Both get an untimed warm-up first (the model's first call is slow on
CPU). The passes alternate for --rounds rounds, so drifts in machine speed hit both; each
round gives a ratio and the median ratio is the result (target ≥ 0.95 on CPU).

    python experiments/bench_embed.py [--samples 256] [--rounds 3] [--model ViT-B-32]
        [--device cpu|cuda] [--precision fp32] [--workers N] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from mmia.embed import decode_image, embed_shards
from mmia.model import load_model


def write_shards(folder: str, n: int, per_shard: int, size: int, seed: int = 0) -> str:
    """LAION-like shards of `size`-pixel JPEG photos-ish (smooth noise) with captions."""
    rng = np.random.default_rng(seed)
    n_shards = (n + per_shard - 1) // per_shard
    for s in range(n_shards):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for row in range(min(per_shard, n - s * per_shard)):
                key = f"{s:05d}{row:04d}"
                small = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
                image = Image.fromarray(small).resize((size, size), Image.BICUBIC)
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=90)
                colour = rng.choice(["red", "blue"])
                caption = f"a photo number {s * per_shard + row} of a {colour} thing"
                members = ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", caption.encode()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(folder, f"{{00000..{n_shards - 1:05d}}}.tar")


@torch.no_grad()
def bare_throughput(loaded, pattern: str, batch_size: int) -> float:
    from mmia.shards import Sample, read_samples

    samples = [s for s in read_samples(pattern, split=False) if isinstance(s, Sample)]
    images = torch.stack([loaded.preprocess(decode_image(s.image_bytes)) for s in samples])
    tokens = loaded.tokenizer([s.caption for s in samples])
    images = images.to(loaded.device, loaded.input_dtype)  # already on the device: pure compute
    tokens = tokens.to(loaded.device)
    with loaded.autocast():
        loaded.model.encode_image(images[:batch_size], normalize=True)  # untimed warm-up
        loaded.model.encode_text(tokens[:batch_size], normalize=True)
        _sync(loaded.device)
        start = time.perf_counter()
        for i in range(0, len(samples), batch_size):
            loaded.model.encode_image(images[i:i + batch_size], normalize=True)
            loaded.model.encode_text(tokens[i:i + batch_size], normalize=True)
        _sync(loaded.device)
    return len(samples) / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, …")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers of the end-to-end pass (default: mmia's, 1)")
    args = parser.parse_args()
    loaded = load_model(args.model, device=args.device, precision=args.precision)
    ratios = []
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; python {sys.version.split()[0]}")
    gpu = f", {torch.cuda.get_device_name(loaded.device)}" if loaded.device.type == "cuda" else ""
    print(f"model {args.model} (random init) on {loaded.device}{gpu}, {args.precision}, "
          f"{args.samples} samples of {args.image_size}px JPEG, batch {args.batch_size}, "
          f"workers {args.workers if args.workers is not None else 'default'}, "
          f"{args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_shards(tmp, args.samples, 128, args.image_size)
        warm_dir = os.path.join(tmp, "warm")
        os.makedirs(warm_dir)
        warm = write_shards(warm_dir, args.batch_size, 128, args.image_size, seed=1)
        embed_shards(loaded, [warm], os.path.join(tmp, "warm-cache"),  # untimed warm-up
                     batch_size=args.batch_size, workers=args.workers, progress=False)
        for r in range(args.rounds):
            bare = bare_throughput(loaded, pattern, args.batch_size)
            result = embed_shards(loaded, [pattern], os.path.join(tmp, f"cache-{r}"),
                                  batch_size=args.batch_size, workers=args.workers,
                                  progress=False)
            e2e = len(result.records) / result.seconds
            ratios.append(e2e / bare)
            print(f"round {r + 1}: bare encode_image+encode_text {bare:.1f} samples/s, "
                  f"end-to-end mmia embed {e2e:.1f} samples/s, ratio {e2e / bare:.3f}",
                  flush=True)
    print(f"median ratio end-to-end / bare: {float(np.median(ratios)):.3f}")


if __name__ == "__main__":
    main()
