"""torchrun (issue 13 item 6): ranks split the shards, write one cache, rank 0 alone reports.

Real `torchrun --standalone --nproc_per_node 2` runs on CPU, each compared with a single-process
run of the same command; a rank that fails ends the whole run with its error, promptly.
"""

from __future__ import annotations

import glob
import logging
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from shardgen import write_good_shards

from mmia.cache import EmbeddingCache
from mmia.cli import main
from mmia.errors import MmiaError

REPO = pathlib.Path(__file__).resolve().parents[1]
HANG_GUARD_S = 240  # a run that has not ended by then hangs
# one torch thread in every process: the same arithmetic in the ranks and in the reference
TINY_ARGS = ("--model", "mmia-test-tiny", "--device", "cpu", "--no-progress", "--workers", "0",
             "--batch-size", "4", "--threads", "1")

# Rank 1 embeds its share, waits until rank 0 has embedded its own (and so waits for the
# others), then fails with an MmiaError, and lingers 2 s before exiting: rank 0, not torchrun's
# SIGTERM, is the first to act on the failure.
FAILING_RANK = """
import os, pathlib, sys, time
import mmia.embed
from mmia.errors import MmiaError

marker = pathlib.Path(sys.argv[1])
real = mmia.embed.embed_shards
rank = os.environ["RANK"]

def rank0(*args, **kwargs):
    result = real(*args, **kwargs)
    marker.touch()
    return result

def rank1(*args, **kwargs):
    real(*args, **kwargs)
    for _ in range(600):
        if marker.exists():
            break
        time.sleep(0.05)
    raise MmiaError("cannot read shard X (injected on rank 1)")

mmia.embed.embed_shards = rank0 if rank == "0" else rank1
from mmia.cli import main
from mmia.errors import MmiaError
rc = main(sys.argv[2:])
if rank == "1":
    time.sleep(2)
raise SystemExit(rc)
"""


def _torchrun(*argv: str, script: str | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m mmia ARGV` (or SCRIPT ARGV) on CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    target = [script] if script else ["-m", "mmia"]
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         *target, *argv], env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)


@pytest.fixture
def restore_threads():
    """The in-process reference run sets torch's threads (--threads 1): restored after."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _committed(cache: pathlib.Path) -> dict[str, tuple[list[str], np.ndarray]]:
    """Store folder (relative) → (every digest committed there, repeats included; their rows),
    read from the committed segments (those with a manifest), whatever the store holds."""
    stores: dict[str, tuple[list[str], list[np.ndarray]]] = {}
    for manifest in sorted(glob.glob(str(cache / "**" / "*.seg.json"), recursive=True)):
        if "quarantine" in manifest:
            continue
        folder = os.path.relpath(os.path.dirname(manifest), cache)
        digests, rows = stores.setdefault(folder, ([], []))
        digests += [k.decode() for k in np.load(manifest.replace(".seg.json", ".keys.npy"))]
        rows.append(np.load(manifest.replace(".seg.json", ".feat.npy")))
    return {folder: (digests, np.concatenate(rows)) for folder, (digests, rows) in stores.items()}


def _assert_same_cache(distributed: pathlib.Path, single: pathlib.Path) -> None:
    """Same stores, same digests in each, each committed once, identical feature rows; and
    the cache serves the same view-0 image and caption features."""
    got, want = _committed(distributed), _committed(single)
    assert sorted(got) == sorted(want)
    for store, (digests, rows) in got.items():
        assert len(digests) == len(set(digests)), f"{store}: a digest committed twice"
        assert sorted(digests) == sorted(want[store][0]), store
        mine = dict(zip(digests, rows, strict=True))
        theirs = dict(zip(*want[store], strict=True))
        for digest in digests:
            np.testing.assert_array_equal(mine[digest], theirs[digest], err_msg=store)
    for store, (digests, _) in got.items():
        fingerprint, *rest = pathlib.PurePath(store).parts
        a, b = (EmbeddingCache(str(c), fingerprint) for c in (distributed, single))
        if rest == ["text"]:
            np.testing.assert_array_equal(a.read_text(digests), b.read_text(digests))
        elif rest == ["image", "view-000"]:
            np.testing.assert_array_equal(a.read_image(digests, [0]), b.read_image(digests, [0]))


def test_embed_with_two_ranks_fills_the_cache_of_one_process(tmp_path, tiny_config, capsys,
                                                             restore_threads):
    """5 shards: rank 0 embeds 00000, 00002, 00004 and rank 1 00001, 00003; the cache equals
    a single-process run's, and only rank 0 prints the summary, summed over the ranks."""
    (tmp_path / "s").mkdir()
    shards = write_good_shards(tmp_path / "s", 5, 3)
    argv = ["embed", *TINY_ARGS, "--model-config", tiny_config, "--shards", shards,
            "--views", "1"]
    done = _torchrun(*argv, "--cache", str(tmp_path / "ranks"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*argv, "--cache", str(tmp_path / "single")]) == 0
    single_out = capsys.readouterr().out
    assert "15 samples: 15 embedded now, 0 already cached" in single_out
    summaries = [line for line in done.stdout.splitlines() if "samples:" in line]
    assert summaries == ["15 samples: 15 embedded now, 0 already cached"], done.stdout
    _assert_same_cache(tmp_path / "ranks", tmp_path / "single")
    stores = _committed(tmp_path / "ranks")
    assert sum(s.endswith(("view-000", "text")) for s in stores) == 2, sorted(stores)


def test_audit_with_two_ranks_scores_as_one_process(tmp_path, tiny_config, restore_threads):
    """Each rank embeds its share of every role (views for AEA, none for the pool); rank 0
    then audits a complete cache without a forward pass and alone writes the outputs."""
    roles = {}
    for i, role in enumerate(("members", "nonmembers", "known-nonmembers", "pool")):
        (tmp_path / role).mkdir()
        roles[role] = write_good_shards(tmp_path / role, 3, 4, seed=i + 1)
    argv = ["audit", *TINY_ARGS, "--model-config", tiny_config, "--attacks", "csa,aea,wsa",
            "--views", "2", "--bootstrap", "20",
            *[arg for role, pattern in roles.items() for arg in (f"--{role}", pattern)]]
    done = _torchrun(*argv, "--cache", str(tmp_path / "ranks"), "--out", str(tmp_path / "o2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*argv, "--cache", str(tmp_path / "single"), "--out", str(tmp_path / "o1")]) == 0
    assert (tmp_path / "o2" / "scores.csv").read_text() == \
        (tmp_path / "o1" / "scores.csv").read_text()
    assert done.stdout.count("wrote metrics.json") == 1, done.stdout
    for role in ("members", "nonmembers", "known_nonmembers", "pool"):  # rank 0's audit
        assert f"{role}: everything was cached: no forward pass was made" in done.stderr, role
    _assert_same_cache(tmp_path / "ranks", tmp_path / "single")
    augmented = [s for s in _committed(tmp_path / "ranks") if "aug-" in s]
    assert augmented, "the ranks embedded no augmented view for AEA"


def test_a_failing_rank_ends_the_run_with_its_error(tmp_path, tiny_config):
    """Rank 1 raises an MmiaError while rank 0 waits for it: rank 0 stops at once naming it
    (not terminated by torchrun), the run exits ≠ 0 (no rank hangs or has to be killed), each
    rank with one mmia line."""
    (tmp_path / "s").mkdir()
    shards = write_good_shards(tmp_path / "s", 4, 2)
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    done = _torchrun(str(tmp_path / "rank0-done"), "embed", *TINY_ARGS, "--model-config",
                     tiny_config, "--shards", shards, "--cache", str(tmp_path / "c"),
                     script=str(script))
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("mmia:")]
    assert sorted(lines) == [
        "mmia: error: cannot read shard X (injected on rank 1)",
        "mmia: error: rank 1 of 2 failed: cannot read shard X (injected on rank 1) (the cache "
        "keeps every committed segment: fix that, then rerun)"], done.stderr[-3000:]
    assert "SIGKILL" not in done.stderr, "a rank had to be killed"
    assert f"{os.sep}mmia{os.sep}" not in "".join(
        line for line in done.stderr.splitlines() if line.strip().startswith("File ")), \
        "a traceback through mmia"
    assert "samples:" not in done.stdout  # rank 0 reported no summary


# ---------------------------------------------------------------- without torchrun, and plans


def test_alone_nothing_is_distributed(monkeypatch):
    """Without torchrun's variables: one rank, the whole shard list, no store contacted."""
    import torch.distributed

    from mmia import distributed

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)

    def no_store(*args, **kwargs):
        raise AssertionError("a single process contacted a rendezvous store")

    monkeypatch.setattr(torch.distributed, "rendezvous", no_store)
    ranks = distributed.current_ranks()
    assert ranks.share == (0, 1) and ranks.is_main and not ranks.many
    assert distributed.setup_rank("auto") == "auto"
    assert distributed.run_share(ranks, lambda: 7) == [7]
    assert distributed.embed_config_in_shares(None, None) is True


def test_a_rank_gets_every_nth_shard_and_its_device(monkeypatch):
    from mmia import distributed

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.current_ranks().share == (2, 3)
    assert not distributed.is_main()
    level = distributed.log.level
    try:
        assert distributed.setup_rank("cpu") == "cpu"
        assert not distributed.log.isEnabledFor(logging.INFO)  # rank 0 alone reports
    finally:
        distributed.log.setLevel(level)
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(MmiaError, match="RANK='3' is not a rank of WORLD_SIZE=3"):
        distributed.current_ranks()


def test_embedding_plan_follows_the_commands(tiny_config, tmp_path):
    """The models, roles and views each rank embeds are those `run_audit` / `run_inference`
    read: rcsa's reference models embed the evaluation roles and the known non-members."""
    from mmia.audit import AuditConfig
    from mmia.distributed import embedding_plan
    from mmia.infer import InferConfig
    from mmia.modelref import ModelRequest

    target = types.SimpleNamespace(fingerprint="0" * 16, description={})

    def plan(cfg):
        return [("target" if model is target else model, role, patterns, views)
                for model, role, patterns, views in embedding_plan(cfg, target)]

    audit = AuditConfig(members=["m"], nonmembers=["n"], known_nonmembers=["k"], pool=["p"],
                        attacks=("csa", "aea", "wsa"), views=3)
    assert plan(audit) == [("target", "members", ["m"], 3), ("target", "nonmembers", ["n"], 3),
                           ("target", "known_nonmembers", ["k"], 3), ("target", "pool", ["p"], 0)]
    audit = AuditConfig(members=["m"], nonmembers=["n"], attacks=("csa",), views=3)
    assert plan(audit) == [("target", "members", ["m"], 0), ("target", "nonmembers", ["n"], 0)]
    infer = InferConfig(candidates=["c"], known_nonmembers=["k"], pool=["p"],
                        attacks=("csa", "aea"), views=2)
    assert plan(infer) == [("target", "candidates", ["c"], 2),
                           ("target", "known_nonmembers", ["k"], 2)]
    ref = ModelRequest("mmia-test-tiny", model_config=tiny_config)
    audit = AuditConfig(members=["m"], nonmembers=["n"], known_nonmembers=["k"], pool=["p"],
                        attacks=("csa", "rcsa"), references=(ref,), cache=str(tmp_path))
    steps = embedding_plan(audit, target)
    assert [(r, p, v) for _, r, p, v in steps[4:]] == [
        ("members (reference 1)", ["m"], 0), ("nonmembers (reference 1)", ["n"], 0),
        ("known_nonmembers (reference 1)", ["k"], 0)]
    assert all(model.request == ref for model, *_ in steps[4:])
    audit = AuditConfig(members=["m"], nonmembers=["n"], known_nonmembers=["k"],
                        attacks=("mcd", "loss", "grad"), mcd_passes=2)
    steps = [(type(model).__name__, model.base is target, r)
             for model, r, _, _ in embedding_plan(audit, target)[3:]]
    assert steps == [("DropoutPass", True, f"{role} (dropout pass {i})")
                     for i in (1, 2) for role in ("members", "nonmembers", "known_nonmembers")] \
        + [("WhiteboxNorms", True, f"{role} (white-box 1)")
           for role in ("members", "nonmembers", "known_nonmembers")]
