"""Checks of numeric settings shared by the Python API and the CLI (embed, audit, pilot).

Each raises a one-line `MmiaError` naming the flag, the accepted range and the value given,
so a bad value stops a run before any model is loaded or sample embedded.
"""

from __future__ import annotations

import math
import numbers

from mmia.errors import MmiaError

MAX_SEED = 2**32 - 1  # numpy's seeds (RandomState, default_rng) are 32-bit unsigned
WSA_AUTO = "auto"  # --wsa-lambda auto: WSA picks λ from Ko et al.'s grid (mmia.attacks.wsa)


def check_int(flag: str, value: object, low: int, high: int | None = None) -> None:
    """`value` is an integer (not a bool) in [low, high]."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and value >= low and (high is None or value <= high):
        return
    bound = f"from {low} to {high}" if high is not None else f"≥ {low}"
    raise MmiaError(f"{flag} must be an integer {bound}, got {value!r}")


def check_finite(flag: str, value: object) -> None:
    """`value` is a real number, not NaN or ±inf."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value):
        raise MmiaError(f"{flag} must be a finite number, got {value!r}")


def check_fraction(flag: str, value: object) -> None:
    """`value` is a number strictly between 0 and 1."""
    check_finite(flag, value)
    if not 0 < value < 1:
        raise MmiaError(f"{flag} must be between 0 and 1 (exclusive), got {value!r}")


def check_seed(value: object, flag: str = "--seed") -> None:
    """`value` can seed numpy: an integer from 0 to 2**32 - 1."""
    check_int(flag, value, 0, MAX_SEED)


def check_embed_settings(views: object, batch_size: object, workers: object,
                         threads: object = None) -> None:
    """What every embedding run needs: views ≥ 0, batch size ≥ 1, workers ≥ 0 and threads ≥ 1
    (or None: the defaults)."""
    check_int("--views", views, 0)
    check_int("--batch-size", batch_size, 1)
    if workers is not None:
        check_int("--workers", workers, 0)
    if threads is not None:
        check_int("--threads", threads, 1)


def check_attack_settings(views: object, seed: object, n_bootstrap: object,
                          wsa_lambda: object) -> None:
    """The attack settings `mmia audit` and `mmia pilot` share."""
    check_int("--views", views, 0)
    check_seed(seed)
    check_int("--bootstrap", n_bootstrap, 0)
    check_wsa_lambda(wsa_lambda)


def check_wsa_lambda(value: object) -> None:
    """`value` is "auto" or a finite number."""
    if value == WSA_AUTO and isinstance(value, str):
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value):
        raise MmiaError(f"--wsa-lambda must be {WSA_AUTO!r} or a finite number, got {value!r}")


def wsa_lambda(text: str) -> float | str:
    """An argparse type for --wsa-lambda: "auto" (any case) or a number; other text passes
    through, for `check_wsa_lambda` to refuse in one line rather than argparse's usage."""
    if text.strip().lower() == WSA_AUTO:
        return WSA_AUTO
    try:
        return float(text)
    except ValueError:
        return text


def integer(text: str) -> int:
    """An argparse type: an integer, also written as an integral float ("5e9", "100.0").

    Its name is what argparse shows for other text: "invalid integer value: '1.5'".
    """
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"not an integer: {text!r}") from None
    if not number.is_integer():
        raise ValueError(f"not an integer: {text!r}")
    return int(number)
