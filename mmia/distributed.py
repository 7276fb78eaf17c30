"""Many processes, one cache: `torchrun --nproc_per_node N -m mmia embed|audit|infer …`.

Under torchrun (WORLD_SIZE > 1 in the environment) every rank embeds its share of the shards:
rank r takes every N-th shard from the r-th on, after pattern expansion
(`embed_shards(shard_share=…)`), and commits into the one cache (concurrent writers are safe:
see `mmia.cache`). Rank 0 then waits for every rank and alone reports: `embed` prints the
summed summary, `audit` and `infer` run the attacks on the now complete cache (no forward pass)
and write the outputs. The other ranks print nothing and exit 0 once their share is committed.

The ranks exchange a few small Python objects through the key-value store torchrun already
runs (MASTER_ADDR:MASTER_PORT), not through a process group: no collective blocks a rank inside
C++ where SIGTERM cannot reach it (a gloo barrier waiting for a dead rank held its peer until
torchrun's SIGKILL, 30 s later), and `mmia.shards.read_samples`, which splits shards by rank
whenever a default process group exists, could not split them a second time. Rank 0 polls the
store, so a rank that fails is known at once: it records its one-line error there before it
exits, and rank 0 stops with "rank R of N failed: …" (torchrun's agent also stops the ranks of
that machine: SIGTERM, exit 143). Rank 0 waits at most MMIA_DIST_TIMEOUT seconds (default 48 h).

Without torchrun every function here is a no-op: no store, no change of behaviour.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
import pickle
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

from mmia.errors import MmiaError

TIMEOUT_ENV = "MMIA_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 48 * 3600  # a share can take hours; rank 0 waits for the slowest rank
CONNECT_TIMEOUT = datetime.timedelta(seconds=60)  # reaching torchrun's store
POLL_S = 0.05  # rank 0's look at the store while it waits
MAX_EXAMPLES = 3  # skip examples kept per reason in a merged summary (as in mmia.embed)
log = logging.getLogger("mmia")
_EXCHANGES = itertools.count()  # the n-th exchange of this process (the same on every rank)
T = TypeVar("T")


class PeerFailed(MmiaError):
    """Another rank failed, vanished or took too long before every share was done."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among torchrun's: (0, 1, 0) when run alone."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def share(self) -> tuple[int, int]:
        """`embed_shards`'s shard_share: every world_size-th shard from the rank-th on."""
        return self.rank, self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise MmiaError(f"{name}={text!r} is not an integer: torchrun sets it; unset it when "
                        "running without torchrun") from None


def current_ranks() -> Ranks:
    """The torchrun ranks from WORLD_SIZE, RANK and LOCAL_RANK; a single process without them."""
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return Ranks()
    rank, local_rank = _env_int("RANK", -1), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise MmiaError(f"RANK={os.environ.get('RANK')!r} is not a rank of WORLD_SIZE="
                        f"{world_size}: start mmia with torchrun, which sets both")
    return Ranks(rank, world_size, local_rank)


def is_main() -> bool:
    """Whether this process reports (rank 0, or the only process)."""
    return current_ranks().is_main


def setup_rank(device: str) -> str:
    """Under torchrun: ranks other than 0 log warnings only (rank 0 reports), and the --device
    of this rank: `auto` (with a GPU) and `cuda` become cuda:LOCAL_RANK, one GPU per process
    of a machine; cpu, mps and an explicit cuda:N stay as given. Alone: `device` as it is."""
    ranks = current_ranks()
    if not ranks.many:
        return device
    wait_timeout()  # a bad MMIA_DIST_TIMEOUT is one line before any work
    if not ranks.is_main:
        log.setLevel(logging.WARNING)
    if str(device).strip().lower() not in ("auto", "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return device  # auto → cpu; cuda is refused by the device check as without torchrun
    count = torch.cuda.device_count()
    if ranks.local_rank >= count:
        raise MmiaError(f"torchrun started local rank {ranks.local_rank} but this machine has "
                        f"{count} visible GPU(s): pass --nproc_per_node {count} or less")
    torch.cuda.set_device(ranks.local_rank)
    return f"cuda:{ranks.local_rank}"


def wait_timeout() -> float:
    """Seconds rank 0 waits for the other ranks (MMIA_DIST_TIMEOUT, default 48 h)."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise MmiaError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return seconds


# ------------------------------------------------------------------------------ the exchange


def _store(exchange: int):
    """torchrun's key-value store, under a prefix of its own for this run and exchange."""
    import torch.distributed as dist

    store, _, _ = next(dist.rendezvous("env://", timeout=CONNECT_TIMEOUT))
    run = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"mmia/{run}/{attempt}/{exchange}/", store)


def run_share(ranks: Ranks, work: Callable[[], T]) -> list[T] | None:
    """`work()` on this rank; then rank 0 waits for every rank and gets their results in rank
    order (the other ranks get None). A rank whose work raises records its error for rank 0
    and re-raises; rank 0 then raises PeerFailed. Alone: [work()]."""
    if not ranks.many:
        return [work()]
    exchange = next(_EXCHANGES)
    try:
        result = work()
    except Exception as exc:
        _record_failure(ranks, exchange, exc)
        raise
    try:
        store = _store(exchange)
        store.set(f"result/{ranks.rank}", pickle.dumps(result))
        store.add("done", 1)
        return _collect(ranks, store) if ranks.is_main else None
    except (RuntimeError, ValueError) as exc:  # the store went away (its host died)
        raise PeerFailed(f"rank {ranks.rank} of {ranks.world_size} lost torchrun's store "
                         f"({_first_line(exc)}): rerun; the cache keeps every committed "
                         "segment") from None


def _record_failure(ranks: Ranks, exchange: int, exc: Exception) -> None:
    """Tell rank 0 why this rank stops (best effort: the error is printed here anyway)."""
    try:
        store = _store(exchange)
        store.set(f"failed/{ranks.rank}", _first_line(exc).encode())
        store.add("failures", 1)
    except Exception:  # noqa: BLE001 - the store may be gone; torchrun still sees the exit
        log.debug("could not record the failure of rank %d", ranks.rank, exc_info=True)


def _collect(ranks: Ranks, store) -> list:
    """Rank 0: wait until every rank is done (or one failed, or the timeout passed)."""
    deadline = time.monotonic() + wait_timeout()
    while int(store.add("done", 0)) < ranks.world_size:
        if int(store.add("failures", 0)):
            raise PeerFailed(_failure_line(ranks, store))
        if time.monotonic() > deadline:
            raise PeerFailed(
                f"waited {wait_timeout():.0f} s ({TIMEOUT_ENV}) for the other ranks, "
                f"{int(store.add('done', 0))} of {ranks.world_size} are done: rerun (the cache "
                "keeps every committed segment) or raise the timeout")
        time.sleep(POLL_S)
    return [pickle.loads(store.get(f"result/{r}")) for r in range(ranks.world_size)]


def _failure_line(ranks: Ranks, store) -> str:
    failed = [r for r in range(ranks.world_size) if store.check([f"failed/{r}"])]
    first = failed[0] if failed else "?"
    why = store.get(f"failed/{first}").decode() if failed else "unknown error"
    return (f"rank {first} of {ranks.world_size} failed: {why} (the cache keeps every "
            "committed segment: fix that, then rerun)")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


# ------------------------------------------------------------------------------ embed


def embed_in_shares(embed: Callable[[tuple[int, int]], Any]):
    """`embed(shard_share)` on this rank's share; rank 0 gets the EmbedResult summed over the
    ranks, the other ranks None. Alone: `embed((0, 1))` as it is."""
    ranks = current_ranks()

    def counts():  # a rank's counts, not its samples
        result = embed(ranks.share)
        return result if not ranks.many else (replace(result, records=[]), len(result.records))

    results = run_share(ranks, counts)
    if results is None:
        return None
    if not ranks.many:
        return results[0]
    return merge_results([r for r, _ in results], sum(n for _, n in results))


def merge_results(results: list, n_samples: int):
    """One EmbedResult summing the ranks' counts (records: a stand-in of n_samples length,
    for the summary; seconds: the slowest rank's, so the rate is the whole run's)."""
    merged: dict[str, Any] = {}
    for f in fields(results[0]):
        values = [getattr(r, f.name) for r in results]
        if f.name == "records":
            merged[f.name] = range(n_samples)
        elif f.name == "seconds":
            merged[f.name] = max(values)
        elif f.name == "skip_examples":
            merged[f.name] = _merged_examples(values)
        elif isinstance(values[0], Counter):
            merged[f.name] = sum(values, Counter())
        elif isinstance(values[0], int) and not isinstance(values[0], bool):
            merged[f.name] = sum(values)
    return replace(results[0], **merged)


def _merged_examples(per_rank: list[dict[str, list[str]]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for examples in per_rank:
        for reason, items in examples.items():
            kept = out.setdefault(reason, [])
            kept += items[: MAX_EXAMPLES - len(kept)]
    return out


# ------------------------------------------------------------------------------ audit, infer


def embedding_plan(cfg, loaded) -> list[tuple[object, str, list[str], int]]:
    """(model, role, shard patterns, views) of everything `run_audit` / `run_inference` embeds
    for this config: every role under the target `loaded`, with the views they ask for (K views
    only when AEA runs, none for the pool, which `mmia infer` embeds only for WSA), then what
    the companion models (rcsa's references, mcd's dropout passes, loss/grad's norms) give."""
    from mmia.audit import ROLES, companion_jobs, companion_models, role_views
    from mmia.infer import ROLES as INFER_ROLES
    from mmia.infer import InferConfig

    views = cfg.views if "aea" in cfg.attacks else 0
    if isinstance(cfg, InferConfig):
        roles, companions = [r for r in INFER_ROLES if r != "pool" or "wsa" in cfg.attacks], []
    else:
        # a companion that cannot be made is left out here; rank 0 notes it in the audit
        roles, companions = list(ROLES), companion_jobs(cfg, companion_models(cfg, loaded)[0])
    plan = [(loaded, role, list(getattr(cfg, role)), role_views(role, views))
            for role in roles if getattr(cfg, role)]
    return plan + [(model, role, patterns, 0) for model, role, patterns in companions]


def embed_config_in_shares(loaded, cfg) -> bool:
    """Under torchrun, every rank embeds its share of every role of `cfg` (an AuditConfig or
    InferConfig); True on rank 0 once every rank is done (it goes on to run the attacks on a
    complete cache), False on the others. Alone: nothing, True."""
    from mmia.embed import embed_shards

    ranks = current_ranks()
    if not ranks.many:
        return True

    def embed_every_role() -> None:
        for model, role, patterns, views in embedding_plan(cfg, loaded):
            log.info("embedding %s (rank %d's share of %d) …", role, ranks.rank,
                     ranks.world_size)
            try:
                embed_shards(model, patterns, cfg.cache, views=views,
                             batch_size=cfg.batch_size, workers=cfg.workers,
                             progress=cfg.progress if ranks.is_main else False,
                             keep_view_features=cfg.keep_view_features, threads=cfg.threads,
                             shard_share=ranks.share)
            except MmiaError:
                if model is loaded:
                    raise
                # a companion model that cannot embed: rank 0's audit skips its attack
                log.warning("embedding %s failed: its attack will be skipped", role)

    run_share(ranks, embed_every_role)
    return ranks.is_main
