"""LAION-shaped synthetic image-text data with ground-truth membership.

Every pair has *generalisable* content (shapes, colours, positions, background) that the caption
describes, plus *idiosyncrasies* that only memorisation can exploit: a per-sample random block
texture blended into the image and a few rare random-syllable words appended to the caption.

Shards follow the img2dataset webdataset layout (``NNNNN.tar`` with ``KEY.jpg``/``KEY.txt``/
``KEY.json``, ``NNNNN_stats.json``) plus a ``NNNNN.manifest.json`` listing keys and split.
Output is byte-identical for the same config.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SPLITS = (
    "train",
    "eval_members",
    "eval_nonmembers",
    "known_nonmembers",
    "pool",
    "reference",
    "post_release",
    "post_release_known",
)
# Each split gets its own shard-id range so keys are globally unique.
SHARD_BASE = {name: 1000 * i for i, name in enumerate(SPLITS)}
OOM_SHARD_COUNT = 5  # img2dataset: digits for the shard id
OOM_SAMPLE_PER_SHARD = 4  # img2dataset: digits for the row within a shard

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHIFT_COLOURS = {
    "teal": (0, 128, 128),
    "pink": (255, 150, 200),
    "brown": (120, 70, 20),
    "lime": (170, 255, 0),
}
BACKGROUNDS = {
    "gray": (128, 128, 128),
    "beige": (225, 210, 170),
    "navy": (20, 30, 80),
    "olive": (110, 120, 40),
}
SHIFT_BACKGROUNDS = {"maroon": (100, 10, 30), "cyan": (90, 220, 230)}
SHAPES = ("circle", "square", "triangle")
SHIFT_SHAPES = ("star", "ring", "diamond")
POSITIONS = {
    "top left": (0.25, 0.25),
    "top": (0.5, 0.25),
    "top right": (0.75, 0.25),
    "left": (0.25, 0.5),
    "center": (0.5, 0.5),
    "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom": (0.5, 0.75),
    "bottom right": (0.75, 0.75),
}
SIZES = {"small": 0.11, "large": 0.19}
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"


@dataclass(frozen=True)
class WorldConfig:
    """Sizes and knobs of the synthetic world."""

    seed: int = 0
    n_members: int = 1000  # target training set (= all members)
    n_eval: int = 300  # eval_members (subset of train) and eval_nonmembers, each
    n_known_nonmembers: int = 300
    n_pool_members: int = 150  # pool members drawn from train (outside eval_members)
    n_pool_nonmembers: int = 150
    n_reference: int = 1000  # reference-model training set, disjoint from the target's
    n_post_release: int = 300
    n_post_release_known: int = 300  # the attacker's known non-members, post-release style
    image_size: int = 64
    jpeg_quality: int = 90
    samples_per_shard: int = 1000
    idio_strength: float = 0.35  # blend weight of the per-sample texture (0 = none)
    texture_cells: int = 8  # texture is a texture_cells x texture_cells grid of random colours
    n_rare_words: int = 2  # random-syllable words appended to each caption (0 = none)
    shift_strength: float = 0.7  # post_release: prob. each attribute comes from the new set

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class World:
    """A generated world on disk."""

    root: Path
    cfg: WorldConfig
    keys: dict[str, list[str]] = field(default_factory=dict)  # split -> keys

    def split_dir(self, split: str) -> Path:
        return self.root / split

    def shards(self, split: str) -> list[Path]:
        return sorted(self.split_dir(split).glob("*.tar"))

    def urls(self, split: str) -> list[str]:
        return [str(p) for p in self.shards(split)]

    @property
    def ground_truth(self) -> Path:
        return self.root / "ground_truth.csv"


@dataclass(frozen=True)
class _Spec:
    """Everything needed to render one sample (image + caption)."""

    uid: str
    image: bytes
    caption: str


def _rare_word(rng: np.random.Generator) -> str:
    n = int(rng.integers(2, 4))
    return "".join(CONSONANTS[rng.integers(len(CONSONANTS))] + VOWELS[rng.integers(len(VOWELS))]
                   for _ in range(n))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                colour: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.45
            a = -np.pi / 2 + i * np.pi / 5
            pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
        draw.polygon(pts, fill=colour)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, int(r / 3)))
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx - r, cy), (cx, cy + r), (cx + r, cy)], fill=colour)
    else:  # pragma: no cover
        raise ValueError(shape)


def _pick(rng: np.random.Generator, base, shifted, shift: float):
    """Pick from the shifted vocabulary with probability ``shift``, else from the base one."""
    pool = shifted if shift > 0 and rng.random() < shift else base
    items = list(pool)
    return items[int(rng.integers(len(items)))], pool


def make_sample(cfg: WorldConfig, index: int, shift: float = 0.0) -> _Spec:
    """Render population sample ``index`` deterministically (seeded by cfg.seed and index)."""
    rng = np.random.default_rng([cfg.seed, index, int(round(shift * 1000))])
    s = cfg.image_size
    bg_name, bg_pool = _pick(rng, BACKGROUNDS, SHIFT_BACKGROUNDS, shift)
    img = Image.new("RGB", (s, s), bg_pool[bg_name])
    draw = ImageDraw.Draw(img)
    n_shapes = int(rng.integers(1, 3))
    if shift > 0 and rng.random() < shift:  # layout shift: more objects, off-grid
        n_shapes = 3
    used: set[str] = set()
    parts = []
    for _ in range(n_shapes):
        pos = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
        while pos in used:
            pos = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
        used.add(pos)
        col_name, col_pool = _pick(rng, COLOURS, SHIFT_COLOURS, shift)
        shape, _ = _pick(rng, SHAPES, SHIFT_SHAPES, shift)
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        cx, cy = POSITIONS[pos]
        jitter = 0.04 + 0.08 * shift
        cx = (cx + rng.uniform(-jitter, jitter)) * s
        cy = (cy + rng.uniform(-jitter, jitter)) * s
        _draw_shape(draw, shape, cx, cy, SIZES[size] * s, col_pool[col_name])
        where = "in the center" if pos == "center" else f"at the {pos}"
        parts.append(f"a {size} {col_name} {shape} {where}")
    arr = np.asarray(img, dtype=np.float32)
    # Idiosyncratic texture: a grid of random colours, upsampled, blended in.
    cells = rng.integers(0, 256, size=(cfg.texture_cells, cfg.texture_cells, 3)).astype(np.uint8)
    tex = np.asarray(Image.fromarray(cells).resize((s, s), Image.NEAREST), dtype=np.float32)
    a = float(cfg.idio_strength)
    arr = np.clip((1 - a) * arr + a * tex, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=cfg.jpeg_quality)
    if shift > 0 and rng.random() < shift:
        caption = "an illustration showing " + " next to ".join(parts) + f" over {bg_name}"
    else:
        caption = " and ".join(parts) + f" on a {bg_name} background"
    rare = [_rare_word(rng) for _ in range(cfg.n_rare_words)]
    if rare:
        caption += ", " + " ".join(rare)
    uid = hashlib.sha1(f"{cfg.seed}:{index}:{shift}".encode()).hexdigest()[:16]
    return _Spec(uid=uid, image=buf.getvalue(), caption=caption)


def make_key(shard_id: int, row: int) -> str:
    """img2dataset key: zero-padded shard_id * 10^k + row."""
    return str(shard_id * 10**OOM_SAMPLE_PER_SHARD + row).zfill(
        OOM_SHARD_COUNT + OOM_SAMPLE_PER_SHARD)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_split(out: Path, split: str, items: list[tuple[_Spec, bool, str]],
                 cfg: WorldConfig) -> list[tuple[str, str, int, str]]:
    """Write one split's shards; items are (spec, member, source_key). Returns GT rows."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, int, str]] = []
    per = cfg.samples_per_shard
    assert per < 10**OOM_SAMPLE_PER_SHARD
    for start in range(0, len(items), per):
        shard_id = SHARD_BASE[split] + start // per
        chunk = items[start:start + per]
        keys, members = [], []
        with open(out / f"{shard_id:05d}.tar", "wb") as fh, \
                tarfile.open(fileobj=fh, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for row, (spec, member, src) in enumerate(chunk):
                key = make_key(shard_id, row)
                meta = {
                    "url": f"https://synthetic.mmia.invalid/img/{spec.uid}.jpg",
                    "caption": spec.caption,
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": cfg.image_size,
                    "height": cfg.image_size,
                    "original_width": cfg.image_size,
                    "original_height": cfg.image_size,
                    "exif": None,
                    "sha256": hashlib.sha256(spec.image).hexdigest(),
                }
                _tar_add(tar, f"{key}.jpg", spec.image)
                _tar_add(tar, f"{key}.txt", spec.caption.encode("utf-8"))
                _tar_add(tar, f"{key}.json", json.dumps(meta, indent=4).encode("utf-8"))
                keys.append(key)
                members.append(int(member))
                rows.append((key, split, int(member), src or key))
        n = len(chunk)
        stats = {
            "count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0,
            "duration": 0.0, "start_time": 0.0, "end_time": 0.0,
            "status_dict": {"success": n},
        }
        (out / f"{shard_id:05d}_stats.json").write_text(json.dumps(stats, indent=4))
        manifest = {"shard": f"{shard_id:05d}", "split": split, "keys": keys, "member": members}
        (out / f"{shard_id:05d}.manifest.json").write_text(json.dumps(manifest, indent=1))
    return rows


def make_world(out_dir: str | Path, cfg: WorldConfig = WorldConfig()) -> World:
    """Generate all splits under ``out_dir`` plus ``ground_truth.csv`` and ``world.json``.

    ground_truth.csv columns: key, split, member, source_key (the train key a copy was made from;
    equal to key otherwise). eval_members and pool members are byte-identical copies of train
    samples under new keys.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([cfg.seed, 12345])
    counter = iter(range(10**9))
    fresh = lambda shift=0.0: make_sample(cfg, next(counter), shift)  # noqa: E731

    train = [fresh() for _ in range(cfg.n_members)]
    perm = rng.permutation(cfg.n_members)
    if cfg.n_eval + cfg.n_pool_members > cfg.n_members:
        raise ValueError("n_eval + n_pool_members must not exceed n_members")
    eval_idx = sorted(perm[:cfg.n_eval].tolist())
    pool_idx = perm[cfg.n_eval:cfg.n_eval + cfg.n_pool_members].tolist()
    train_key = {i: make_key(SHARD_BASE["train"] + i // cfg.samples_per_shard,
                             i % cfg.samples_per_shard) for i in range(cfg.n_members)}

    splits: dict[str, list[tuple[_Spec, bool, str]]] = {}
    splits["train"] = [(s, True, "") for s in train]
    splits["eval_members"] = [(train[i], True, train_key[i]) for i in eval_idx]
    splits["eval_nonmembers"] = [(fresh(), False, "") for _ in range(cfg.n_eval)]
    splits["known_nonmembers"] = [(fresh(), False, "") for _ in range(cfg.n_known_nonmembers)]
    pool = [(train[i], True, train_key[i]) for i in pool_idx]
    pool += [(fresh(), False, "") for _ in range(cfg.n_pool_nonmembers)]
    order = rng.permutation(len(pool))
    splits["pool"] = [pool[i] for i in order]
    splits["reference"] = [(fresh(), False, "") for _ in range(cfg.n_reference)]
    splits["post_release"] = [(fresh(cfg.shift_strength), False, "")
                              for _ in range(cfg.n_post_release)]
    splits["post_release_known"] = [(fresh(cfg.shift_strength), False, "")
                                    for _ in range(cfg.n_post_release_known)]

    world = World(root=root, cfg=cfg)
    gt_rows: list[tuple[str, str, int, str]] = []
    for split in SPLITS:
        rows = _write_split(root / split, split, splits[split], cfg)
        world.keys[split] = [r[0] for r in rows]
        gt_rows += rows
    with open(root / "ground_truth.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["key", "split", "member", "source_key"])
        w.writerows(gt_rows)
    (root / "world.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    return world


def load_world(root: str | Path) -> World:
    """Re-open a world written by :func:`make_world`."""
    root = Path(root)
    cfg = WorldConfig(**json.loads((root / "world.json").read_text()))
    world = World(root=root, cfg=cfg, keys={s: [] for s in SPLITS})
    with open(root / "ground_truth.csv", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            world.keys[row["split"]].append(row["key"])
    return world


def read_ground_truth(root: str | Path) -> dict[str, dict]:
    """key -> {"split", "member" (int), "source_key"}."""
    with open(Path(root) / "ground_truth.csv", encoding="utf-8") as fh:
        return {r["key"]: {"split": r["split"], "member": int(r["member"]),
                           "source_key": r["source_key"]} for r in csv.DictReader(fh)}
