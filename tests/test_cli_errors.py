"""Bad command lines: one `mmia: error:` line naming problem and fix, exit 2, no traceback."""

from __future__ import annotations

import os

import pytest
from shardgen import sample_members, write_good_shards, write_shard

import mmia.cli


def _embed(shards, cache, *model):
    return ["embed", *model, "--shards", shards, "--cache", str(cache), "--device", "cpu",
            "--no-progress", "--workers", "0", "--batch-size", "4"]


def _audit(members, nonmembers, out, cache, *model):
    return ["audit", *model, "--members", members, "--nonmembers", nonmembers,
            "--attacks", "csa", "--bootstrap", "50", "--out", str(out), "--cache", str(cache),
            "--device", "cpu", "--no-progress", "--workers", "0", "--batch-size", "4"]


def _case(case, tmp, tiny):
    """The argv of one bad command line and words its error line must contain."""
    tinym = ("--model", "mmia-test-tiny", "--model-config", tiny)
    (tmp / "good").mkdir()
    (tmp / "other").mkdir()
    good = write_good_shards(tmp / "good", 1, 3)
    other = write_good_shards(tmp / "other", 1, 3, seed=1)
    cache = tmp / "cache"
    if case == "missing_shard":
        return _embed(str(tmp / "nope/00000.tar"), cache, *tinym), ["missing file", "check"]
    if case == "unmatched_brace_range":
        return _embed(str(tmp / "good/{00000..00004}.tar"), cache, *tinym), [
            "missing file", "brace range"]
    if case == "audit_missing_nonmembers":
        return _audit(good, str(tmp / "none/{0..3}.tar"), tmp / "out", cache, *tinym), [
            "missing file"]
    if case == "unknown_model":
        return _embed(good, cache, "--model", "NoSuchNet-9"), ["unknown model", "list_models"]
    if case == "unknown_pretrained_tag":
        return _embed(good, cache, "--model", "ViT-B-32", "--pretrained", "nosuchtag"), [
            "unknown pretrained tag", "list_pretrained"]
    if case == "pretrained_tag_without_network":
        return _embed(good, cache, "--model", "ViT-B-32", "--pretrained", "openai"), [
            "openai", "--pretrained /path"]
    if case == "corrupt_checkpoint":
        (tmp / "bad.pt").write_bytes(os.urandom(4096))
        return _embed(good, cache, *tinym, "--pretrained", str(tmp / "bad.pt")), [
            "cannot load checkpoint", "state dict"]
    if case == "missing_checkpoint":
        return _embed(good, cache, *tinym, "--pretrained", str(tmp / "gone.pt")), [
            "does not exist", "--pretrained"]
    if case == "bad_model_config":
        (tmp / "cfg.json").write_text("{not json")
        return _embed(good, cache, "--model", "x", "--model-config", str(tmp / "cfg.json")), [
            "not valid JSON"]
    if case == "members_and_nonmembers_share_keys":
        return _audit(good, good, tmp / "out", cache, *tinym), [
            "both a member and a non-member", "same shard and key"]
    if case == "empty_evaluation_set":
        bad = write_shard(tmp / "bad.tar", sample_members("a", b"", b"c")
                          + sample_members("b", None, b"c"))
        return _audit(bad, other, tmp / "out", cache, *tinym), ["no usable members",
                                                                 "skip counts"]
    if case == "out_under_a_file":
        (tmp / "afile").write_text("x")
        return _audit(good, other, tmp / "afile/out", cache, *tinym), [
            "out folder", "writable --out"]
    if case == "cache_under_a_file":
        (tmp / "afile").write_text("x")
        return _embed(good, tmp / "afile/cache", *tinym), ["cache folder", "writable --cache"]
    if case == "audit_cache_under_a_file":
        (tmp / "afile").write_text("x")
        return _audit(good, other, tmp / "out", tmp / "afile/cache", *tinym), [
            "cache folder", "writable --cache"]
    if case == "unknown_attack":
        argv = _audit(good, other, tmp / "out", cache, *tinym)
        return [a if a != "csa" else "nope" for a in argv], ["unknown attack"]
    raise AssertionError(case)


CASES = ["missing_shard", "unmatched_brace_range", "audit_missing_nonmembers", "unknown_model",
         "unknown_pretrained_tag", "pretrained_tag_without_network", "corrupt_checkpoint",
         "missing_checkpoint", "bad_model_config", "members_and_nonmembers_share_keys",
         "empty_evaluation_set", "out_under_a_file", "cache_under_a_file",
         "audit_cache_under_a_file", "unknown_attack"]


@pytest.mark.parametrize("case", CASES)
def test_bad_command_line_gives_one_error_line(tmp_path, tiny_config, capsys, monkeypatch,
                                              case):
    """Exactly one `mmia: error:` line naming problem and fix, exit 2, no traceback, and at
    most one connection attempt (no retry loops without network)."""
    import socket

    argv, words = _case(case, tmp_path, tiny_config)
    attempts = []
    connect = socket.create_connection
    monkeypatch.setattr(socket, "create_connection",
                        lambda *a, **k: attempts.append(a) or connect(*a, **k))
    rc = mmia.cli.main(argv)
    printed = capsys.readouterr()
    errors = [line for line in printed.err.splitlines() if line.startswith("mmia: error:")]
    assert rc == 2, printed.err
    assert len(errors) == 1, printed.err
    assert printed.err.rstrip().endswith(errors[0])
    assert "Traceback" not in printed.err + printed.out
    for word in words:
        assert word in errors[0], errors[0]
    assert len(attempts) <= 1, attempts


def test_a_broken_dependency_is_named_not_hidden_as_an_unknown_command(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "mmia.audit", None)  # importing it now raises ImportError
    rc = mmia.cli.main(["audit", "--model", "x", "--members", "a.tar", "--nonmembers", "b.tar",
                        "--out", "o"])
    err = capsys.readouterr().err
    assert rc == 1 and "invalid choice" not in err and "Traceback" not in err
    assert "mmia: error: cannot import mmia.audit" in err


def test_a_dependency_broken_at_startup_is_one_line_too():
    """Blocked before mmia.cli is even imported: `mmia embed --help` still says what broke."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['sklearn'] = None; import mmia.cli; "
            "sys.exit(mmia.cli.main(['embed', '--help']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "mmia: error: cannot import sklearn" in done.stderr
