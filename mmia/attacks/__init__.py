"""Membership-inference attacks sharing the `Attack` contract (see mmia/attacks/base.py)."""

from __future__ import annotations

from mmia.attacks.aea import AEA
from mmia.attacks.base import Attack, Features, MissingInput
from mmia.attacks.blind import Blind
from mmia.attacks.csa import CSA
from mmia.attacks.mcd import MCD
from mmia.attacks.rcsa import RCSA
from mmia.attacks.whitebox import Grad, Loss
from mmia.attacks.wsa import WSA

ATTACKS: dict[str, type[Attack]] = {"csa": CSA, "aea": AEA, "wsa": WSA, "blind": Blind,
                                     "rcsa": RCSA, "mcd": MCD, "loss": Loss, "grad": Grad}


def make_attack(name: str, **params) -> Attack:
    """Instantiate a registered attack by name with constructor parameters."""
    try:
        cls = ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; known: {sorted(ATTACKS)}") from None
    return cls(**params)


__all__ = [
    "AEA",
    "ATTACKS",
    "CSA",
    "MCD",
    "RCSA",
    "WSA",
    "Attack",
    "Blind",
    "Features",
    "Grad",
    "Loss",
    "MissingInput",
    "make_attack",
]
