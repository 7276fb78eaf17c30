"""Pilot world: synthetic LAION-shaped shards with ground truth, and a small CLIP trainer."""

from .synthetic import (
    SPLITS,
    World,
    WorldConfig,
    load_world,
    make_key,
    make_sample,
    make_world,
    read_ground_truth,
)

_TRAIN = ("DEFAULT_MODEL_CONFIG", "PilotWorld", "TrainConfig", "TrainResult", "build_pilot",
          "csa_auc", "embed_pairs", "load_checkpoint", "read_pairs", "register_model_config",
          "train_clip")


def __getattr__(name: str):
    """The trainer's names (`.train`, which imports torch and open_clip) on first use."""
    if name in _TRAIN:
        from . import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL_CONFIG",
    "SPLITS",
    "PilotWorld",
    "TrainConfig",
    "TrainResult",
    "World",
    "WorldConfig",
    "build_pilot",
    "csa_auc",
    "embed_pairs",
    "load_checkpoint",
    "load_world",
    "make_key",
    "make_sample",
    "make_world",
    "read_ground_truth",
    "read_pairs",
    "register_model_config",
    "train_clip",
]
