"""Small open_clip CLIP trainer for the pilot world (CPU, seeded, repeatable)."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from mmia.model import register_model_config
from mmia.shards import Sample, read_samples

from .synthetic import World, WorldConfig, load_world, make_world

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_MODEL_CONFIG = CONFIG_DIR / "mmia-tiny-vit.json"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings for :func:`train_clip`."""

    seed: int = 0
    epochs: int = 15
    batch_size: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    augment: bool = False  # True: open_clip train transform each epoch; False: eval transform once
    max_steps: int | None = None  # stop early (tests)
    threads: int | None = None  # torch.set_num_threads

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """What :func:`train_clip` did."""

    checkpoint: Path
    model_name: str
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def read_pairs(shards: str | Path | list) -> list[tuple[str, bytes, str]]:
    """Read (key, image bytes, caption) from a shard dir, a glob, a tar path or a list of them.

    Uses mmia's shard reader, so training sees exactly the samples an audit sees.
    """
    if isinstance(shards, (list, tuple)):
        paths = [str(p) for p in shards]
    else:
        p = Path(shards)
        paths = sorted(glob.glob(str(p / "*.tar"))) if p.is_dir() else sorted(glob.glob(str(p)))
    if not paths:
        raise FileNotFoundError(f"no shards found in {shards}")
    return [(s.key.rsplit("/", 1)[-1], s.image_bytes, s.caption)
            for s in read_samples(paths, split=False) if isinstance(s, Sample)]


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    e = step - cfg.warmup_steps
    es = max(1, total - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * cfg.lr


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _decode(img: bytes) -> Image.Image:
    return Image.open(io.BytesIO(img)).convert("RGB")


def train_clip(shard_dir_or_urls: str | Path | list, model_config_json: str | Path,
               out_path: str | Path, cfg: TrainConfig = TrainConfig(),
               half: int | None = None) -> TrainResult:
    """Train a small CLIP from scratch on the shards; save a weights_only-loadable checkpoint.

    half: train on a random half of the samples only, drawn with this seed (the pilot's
    reference models: each its own half of the reference split).
    The checkpoint is ``{"state_dict", "model_name", "epoch"}``; the model config JSON is copied
    beside it as ``<model_name>.json``.
    """
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    name = register_model_config(str(model_config_json))
    _seed_all(cfg.seed)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    model.train()
    pairs = read_pairs(shard_dir_or_urls)
    if half is not None:
        keep = np.random.default_rng([half, 1729]).permutation(len(pairs))[: len(pairs) // 2]
        pairs = [pairs[i] for i in np.sort(keep)]
    pils = [_decode(b) for _, b, _ in pairs]
    tokens = tokenizer([c for _, _, c in pairs])
    images = None if cfg.augment else torch.stack([preprocess_val(im) for im in pils])

    decay = [p for n, p in model.named_parameters()
             if p.ndim >= 2 and "embedding" not in n and "logit_scale" not in n]
    no_decay = [p for n, p in model.named_parameters()
                if not (p.ndim >= 2 and "embedding" not in n and "logit_scale" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    n = len(pairs)
    bs = min(cfg.batch_size, n)
    steps_per_epoch = n // bs  # drop_last like open_clip
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    step = 0
    epoch = 0
    while step < total:
        perm = torch.randperm(n, generator=gen)
        if cfg.augment:
            images = torch.stack([preprocess_train(im) for im in pils])
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[b * bs:(b + 1) * bs]
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, cfg)
            img_f, txt_f, scale = model(images[idx], tokens[idx])
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(float(loss.item()))
            step += 1
        epoch += 1
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "model_name": name, "epoch": epoch}, out_path)
    cfg_copy = out_path.parent / f"{name}.json"
    if Path(model_config_json).resolve() != cfg_copy.resolve():
        shutil.copyfile(model_config_json, cfg_copy)
    return TrainResult(checkpoint=out_path, model_name=name, losses=losses,
                       seconds=time.time() - t0)


def load_checkpoint(path: str | Path, model_config_json: str | Path | None = None):
    """Load a checkpoint from :func:`train_clip`; returns (model.eval(), preprocess, tokenizer).

    The config defaults to ``<model_name>.json`` beside the checkpoint.
    """
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    name = ckpt["model_name"]
    register_model_config(str(model_config_json or path.parent / f"{name}.json"))
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


@torch.no_grad()
def embed_pairs(model, preprocess, tokenizer, shards, batch_size: int = 256):
    """Return (keys, image features, text features), L2-normalised float32 numpy arrays."""
    pairs = read_pairs(shards)
    keys = [k for k, _, _ in pairs]
    imgs, txts = [], []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        x = torch.stack([preprocess(_decode(b)) for _, b, _ in chunk])
        t = tokenizer([c for _, _, c in chunk])
        imgs.append(model.encode_image(x, normalize=True).float().numpy())
        txts.append(model.encode_text(t, normalize=True).float().numpy())
    return keys, np.concatenate(imgs), np.concatenate(txts)


def csa_auc(checkpoint: str | Path, member_shards, nonmember_shards) -> float:
    """Cosine-similarity attack AUC (members positive) for a checkpoint."""
    from sklearn.metrics import roc_auc_score

    model, preprocess, tok = load_checkpoint(checkpoint)
    _, mi, mt = embed_pairs(model, preprocess, tok, member_shards)
    _, ni, nt = embed_pairs(model, preprocess, tok, nonmember_shards)
    scores = np.concatenate([(mi * mt).sum(1), (ni * nt).sum(1)])
    labels = np.concatenate([np.ones(len(mi)), np.zeros(len(ni))])
    return float(roc_auc_score(labels, scores))


@dataclass
class PilotWorld:
    """A built pilot: world, target and reference checkpoints, model config."""

    root: Path
    world: World
    target_ckpt: Path
    reference_ckpt: Path
    model_config: Path
    model_name: str
    half_reference_ckpts: list[Path] = field(default_factory=list)


def pilot_hash(world_cfg: WorldConfig, train_cfg: TrainConfig, model_config_json: Path) -> str:
    """Hash of everything that determines a pilot's contents."""
    blob = json.dumps({"world": world_cfg.to_dict(), "train": train_cfg.to_dict(),
                       "model": Path(model_config_json).read_text()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_pilot(root: str | Path, world_cfg: WorldConfig | None = None,
                train_cfg: TrainConfig | None = None,
                model_config_json: str | Path = DEFAULT_MODEL_CONFIG,
                reference: bool = True, half_references: int = 0) -> PilotWorld:
    """Build (or reuse) world + target (+ references) under ``root/<hash>/``.

    A ``done`` marker is written last; a folder without it is wiped and rebuilt. The reference
    model (trained on the ``reference`` split with seed ``train_cfg.seed + 1``) is added when
    ``reference`` is true and it is missing; ``half_references`` more reference models
    (``reference-half-<i>.pt``, each on its own random half of the ``reference`` split, seed
    ``train_cfg.seed + 2 + i``) likewise. Each is written under a temporary name first.
    """
    world_cfg = world_cfg or WorldConfig()
    train_cfg = train_cfg or TrainConfig()
    model_config_json = Path(model_config_json)
    d = Path(root) / pilot_hash(world_cfg, train_cfg, model_config_json)
    name = model_config_json.stem
    pilot = PilotWorld(root=d, world=World(root=d / "world", cfg=world_cfg),
                       target_ckpt=d / "target.pt", reference_ckpt=d / "reference.pt",
                       model_config=d / f"{name}.json", model_name=name)
    if (d / "done").exists():
        pilot.world = load_world(d / "world")
        register_model_config(str(pilot.model_config))
    else:
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        pilot.world = make_world(d / "world", world_cfg)
        train_clip(d / "world" / "train", model_config_json, pilot.target_ckpt, train_cfg)
        (d / "configs.json").write_text(json.dumps(
            {"world": world_cfg.to_dict(), "train": train_cfg.to_dict()}, indent=2,
            sort_keys=True))
        (d / "done").write_text("ok\n")
    wanted = [(pilot.reference_ckpt, 1, None)] if reference else []
    pilot.half_reference_ckpts = [d / f"reference-half-{i}.pt" for i in range(half_references)]
    wanted += [(ckpt, 2 + i, i) for i, ckpt in enumerate(pilot.half_reference_ckpts)]
    for ckpt, seed_offset, half in wanted:
        if ckpt.exists():
            continue
        ref_cfg = TrainConfig(**{**train_cfg.to_dict(), "seed": train_cfg.seed + seed_offset})
        partial = ckpt.with_suffix(".partial.pt")
        train_clip(d / "world" / "reference", model_config_json, partial, ref_cfg, half=half)
        partial.replace(ckpt)
    return pilot
