"""Fault suite, command line (issue 14 item 12): bad weights, devices and settings, SIGTERM and
OS errors are each one `mmia:` line on stderr, exit ≠ 0, no traceback, before any embedding."""

from __future__ import annotations

import errno
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from shardgen import write_good_shards

import mmia.cli
import mmia.model
from mmia.audit import AuditConfig
from mmia.embed import embed_shards
from mmia.errors import MmiaError
from mmia.model import load_model, resolve_device
from mmia.pilot import PilotSettings

TINY = ("--model", "mmia-test-tiny")


def _tiny(config: str) -> tuple[str, ...]:
    return (*TINY, "--model-config", config)


def _embed_argv(config, shards, cache, *extra) -> list[str]:
    return ["embed", *_tiny(config), "--shards", shards, "--cache", str(cache), "--device",
            "cpu", "--no-progress", "--workers", "0", "--batch-size", "4", *extra]


def _audit_argv(config, tmp_path, *extra) -> list[str]:
    members = write_good_shards(_folder(tmp_path / "m"), 1, 3)
    nonmembers = write_good_shards(_folder(tmp_path / "n"), 1, 3, seed=1)
    return ["audit", *_tiny(config), "--members", members, "--nonmembers", nonmembers,
            "--attacks", "csa", "--bootstrap", "20", "--out", str(tmp_path / "out"),
            "--cache", str(tmp_path / "cache"), "--device", "cpu", "--no-progress",
            "--workers", "0", "--batch-size", "4", *extra]


def _folder(path):
    path.mkdir(exist_ok=True)
    return path


def _one_error_line(rc: int, err: str, out: str = "") -> str:
    """The single `mmia:` line of a failed run (asserting there is exactly one)."""
    assert rc not in (0, None), err
    assert "Traceback" not in err + out, err
    lines = [line for line in err.splitlines() if line.startswith("mmia:")]
    assert len(lines) == 1, err
    assert err.rstrip().endswith(lines[0]), err
    return lines[0]


def _no_model_load(monkeypatch) -> None:
    """Fail the test if a command gets as far as loading a model (the start of the work)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(mmia.model, "load_model", refuse)


# ---------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_checkpoint_with_non_finite_weights_is_refused(tmp_path, tiny_model, tiny_config,
                                                       capsys, bad):
    """load_model and `mmia embed --pretrained` name the first bad tensor; nothing embedded."""
    state = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    state["visual.proj"][0, 0] = bad
    state["text_projection"][3, 4] = bad  # before visual.* in the model's state dict
    path = tmp_path / "diverged.pt"
    torch.save(state, path)
    with pytest.raises(MmiaError, match="non-finite.*'text_projection': 1 of 1024"):
        load_model("mmia-test-tiny", str(path), tiny_config, device="cpu")
    shards = write_good_shards(tmp_path, 1, 3)
    rc = mmia.cli.main(_embed_argv(tiny_config, shards, tmp_path / "c", "--pretrained",
                                   str(path)))
    printed = capsys.readouterr()
    line = _one_error_line(rc, printed.err, printed.out)
    assert rc == 2 and "text_projection" in line and "--pretrained" in line, line
    assert os.listdir(tmp_path / "c") == [], "features were cached from non-finite weights"


def test_finite_checkpoint_still_loads(tmp_path, tiny_model, tiny_config):
    path = tmp_path / "fine.pt"
    torch.save(tiny_model.model.state_dict(), path)
    loaded = load_model("mmia-test-tiny", str(path), tiny_config, device="cpu")
    assert loaded.description["weights"] == tiny_model.description["weights"]


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize("device", ["tpu", "meta", "foo", "cuda:x", "cuda:-1", "mps", "xla"])
def test_unusable_device_is_one_line_before_any_work(tmp_path, tiny_config, capsys,
                                                     monkeypatch, device):
    """Refused with the accepted values, before the cache folder is even created."""
    monkeypatch.setattr(mmia.model, "mps_available", lambda: False)
    shards = write_good_shards(tmp_path, 1, 2)
    argv = _embed_argv(tiny_config, shards, tmp_path / "c")
    argv[argv.index("--device") + 1] = device
    rc = mmia.cli.main(argv)
    printed = capsys.readouterr()
    line = _one_error_line(rc, printed.err, printed.out)
    assert rc == 2 and "auto, cpu, cuda, cuda:N" in line, line
    assert not (tmp_path / "c").exists()


def test_cuda_devices_must_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MmiaError, match="no CUDA GPU is visible"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("CUDA") == torch.device("cuda")
    with pytest.raises(MmiaError, match="cuda:2 does not exist: 2 CUDA GPU"):
        resolve_device("cuda:2")


def test_mps_only_where_available(monkeypatch):
    monkeypatch.setattr(mmia.model, "mps_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")
    monkeypatch.setattr(mmia.model, "mps_available", lambda: False)
    with pytest.raises(MmiaError, match="MPS backend is not available"):
        resolve_device("mps")
    assert resolve_device("cpu") == torch.device("cpu")


# ---------------------------------------------------------------- numeric settings

# (command, flag, value, words of the error line)
BAD_SETTINGS = [
    ("audit", "--views", "-1", ["--views", "≥ 0"]),
    ("audit", "--seed", "-1", ["--seed", "4294967295"]),
    ("audit", "--seed", "5e9", ["--seed", "5000000000"]),
    ("audit", "--seed", "4294967296", ["--seed"]),
    ("audit", "--batch-size", "0", ["--batch-size", "≥ 1"]),
    ("audit", "--batch-size", "-3", ["--batch-size"]),
    ("audit", "--bootstrap", "-1", ["--bootstrap", "≥ 0"]),
    ("audit", "--workers", "-2", ["--workers", "≥ 0"]),
    ("audit", "--wsa-lambda", "nan", ["--wsa-lambda", "finite"]),
    ("audit", "--wsa-lambda", "inf", ["--wsa-lambda", "finite"]),
    ("audit", "--calibration-fraction", "nan", ["--calibration-fraction"]),
    ("embed", "--views", "-1", ["--views"]),
    ("embed", "--batch-size", "0", ["--batch-size"]),
    ("embed", "--workers", "-1", ["--workers"]),
    ("pilot", "--seed", "-1", ["--seed"]),
    ("pilot", "--seed", "5e9", ["--seed"]),
    ("pilot", "--views", "-4", ["--views"]),
    ("pilot", "--bootstrap", "-1", ["--bootstrap"]),
    ("pilot", "--wsa-lambda", "-inf", ["--wsa-lambda"]),
    ("pilot", "--world-seed", "-1", ["--world-seed"]),
]


@pytest.mark.parametrize(("command", "flag", "value", "words"), BAD_SETTINGS,
                         ids=[f"{c}{f}={v}" for c, f, v, _ in BAD_SETTINGS])
def test_bad_setting_is_one_line_before_any_work(tmp_path, tiny_config, capsys, monkeypatch,
                                                 command, flag, value, words):
    """Exit 2 and one line naming the flag, before a model is loaded or a pilot built."""
    _no_model_load(monkeypatch)
    monkeypatch.setattr("mmia.pilot.run_pilot", lambda *a, **k: pytest.fail("pilot started"))
    setting = f"{flag}={value}"  # "-inf" alone would read as a flag
    if command == "audit":
        argv = _audit_argv(tiny_config, tmp_path, "--attacks", "csa,aea", setting)
    elif command == "embed":
        argv = _embed_argv(tiny_config, write_good_shards(tmp_path, 1, 2), tmp_path / "c",
                           setting)
    else:
        argv = ["pilot", "--root", str(tmp_path / "root"), "--out", str(tmp_path / "out"),
                "--no-progress", setting]
    rc = mmia.cli.main(argv)
    printed = capsys.readouterr()
    line = _one_error_line(rc, printed.err, printed.out)
    assert rc == 2 and line.startswith("mmia: error:"), line
    for word in words:
        assert word in line, line
    assert not (tmp_path / "c").exists() and not (tmp_path / "cache").exists()


BAD_CONFIGS = [("views", -1), ("seed", -1), ("seed", 2**32), ("seed", 1.5), ("seed", True),
               ("batch_size", 0), ("workers", -1), ("n_bootstrap", -1),
               ("wsa_lambda", math.nan), ("wsa_lambda", math.inf), ("target_fpr", 0.0),
               ("calibration_fraction", 1.0), ("attacks", ("nope",)), ("attacks", "csa"),
               ("attacks", ()), ("aea_aggregation", "median"), ("wsa_classifier", "svm")]


@pytest.mark.parametrize(("field", "value"), BAD_CONFIGS,
                         ids=[f"{f}={v!r}" for f, v in BAD_CONFIGS])
def test_audit_config_refuses_bad_values(field, value):
    with pytest.raises(MmiaError):
        AuditConfig(members=["m.tar"], nonmembers=["n.tar"], **{field: value})


def test_audit_config_accepts_the_edges():
    cfg = AuditConfig(members=["m.tar"], nonmembers=["n.tar"], views=0, seed=2**32 - 1,
                      n_bootstrap=0, workers=0, wsa_lambda=-0.5, attacks=["csa"])
    assert cfg.seed == 2**32 - 1


@pytest.mark.parametrize("settings", [{"seed": -1}, {"seed": 5 * 10**9}, {"views": -1},
                                      {"n_bootstrap": -2}, {"wsa_lambda": math.nan}])
def test_pilot_settings_refuse_bad_values(settings):
    with pytest.raises(MmiaError):
        PilotSettings(**settings)


@pytest.mark.parametrize("settings", [{"views": -1}, {"batch_size": 0}, {"batch_size": -3},
                                      {"workers": -1}])
def test_embed_api_refuses_bad_values_before_touching_the_cache(tmp_path, tiny_model,
                                                                settings):
    shards = write_good_shards(tmp_path, 1, 2)
    with pytest.raises(MmiaError):
        embed_shards(tiny_model, [shards], str(tmp_path / "c"), progress=False, **settings)
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------- SIGTERM

# `mmia embed` whose forward passes are slowed down, so that SIGTERM lands mid-embedding
SLOW_EMBED = """
import sys, time
import open_clip
for name in ("encode_image", "encode_text"):
    original = getattr(open_clip.CLIP, name)
    def slow(self, *args, _original=original, **kwargs):
        time.sleep(0.3)
        return _original(self, *args, **kwargs)
    setattr(open_clip.CLIP, name, slow)
import mmia.cli
sys.exit(mmia.cli.main(sys.argv[1:]))
"""


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_sigterm_mid_embedding_exits_cleanly(tmp_path, tiny_config):
    """`kill -TERM` of `mmia embed` with a DataLoader worker: exit 143, one line, and no
    process of its group outlives it."""
    shards = write_good_shards(tmp_path, 2, 12)
    argv = [*_embed_argv(tiny_config, shards, tmp_path / "c", "--views", "1")]
    argv[argv.index("--workers") + 1] = "1"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EMBED, *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        for line in proc.stderr:  # "model … fingerprint …" comes right before embedding
            if "fingerprint" in line:
                break
        deadline = time.monotonic() + 120
        while len(_group_members(proc.pid)) < 2 and proc.poll() is None:  # the worker is up
            assert time.monotonic() < deadline, "no DataLoader worker started"
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be terminated"
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=120)
        rest = proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc == 143, rest
    assert rest.splitlines() == [rest.strip()] and rest.startswith("mmia: terminated"), rest
    assert _group_members(proc.pid) == [], "a worker or child outlived `mmia embed`"


def test_sigterm_handler_is_restored_after_main(tmp_path, tiny_config, capsys):
    before = signal.getsignal(signal.SIGTERM)
    mmia.cli.main(["embed", *TINY, "--shards", str(tmp_path / "none.tar"), "--cache",
                   str(tmp_path / "c")])
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------- OS errors


@pytest.mark.parametrize(("code", "rc"), [(errno.ENOSPC, 1), (errno.EROFS, 2),
                                          (errno.EACCES, 2), (errno.EMFILE, 1)])
def test_os_error_escaping_a_command_is_one_line(tmp_path, tiny_config, capsys, monkeypatch,
                                                 code, rc):
    """Disk full, read-only, forbidden, too many files: errno's message and the file."""
    victim = str(tmp_path / "c" / "segment.feat.npy")

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), victim)

    monkeypatch.setattr("mmia.embed.embed_shards", fail)
    shards = write_good_shards(tmp_path, 1, 2)
    got = mmia.cli.main(_embed_argv(tiny_config, shards, tmp_path / "c"))
    printed = capsys.readouterr()
    line = _one_error_line(got, printed.err, printed.out)
    assert got == rc and line.startswith("mmia: error:"), line
    assert os.strerror(code) in line and victim in line, line


def test_os_error_re_raised_from_a_worker_is_one_line(tmp_path, tiny_config, capsys,
                                                      monkeypatch):
    """A DataLoader re-raises a worker's OSError with the worker's traceback as its text."""
    text = ("Caught OSError in DataLoader worker process 0.\nOriginal Traceback (most recent "
            "call last):\n  File \"x.py\", line 1, in f\nOSError: [Errno 24] Too many open "
            "files: '/data/00001.tar'\n")

    def fail(*args, **kwargs):
        raise OSError(text)

    monkeypatch.setattr("mmia.embed.embed_shards", fail)
    rc = mmia.cli.main(_embed_argv(tiny_config, write_good_shards(tmp_path, 1, 2),
                                   tmp_path / "c"))
    printed = capsys.readouterr()
    line = _one_error_line(rc, printed.err, printed.out)
    assert rc == 1 and "Too many open files: '/data/00001.tar'" in line, line


def test_disk_full_while_writing_out_keeps_the_previous_outputs(tmp_path, tiny_config, capsys,
                                                               monkeypatch):
    """ENOSPC while `mmia audit` writes --out: one line saying the old outputs are intact."""
    import pathlib

    argv = _audit_argv(tiny_config, tmp_path)
    assert mmia.cli.main(argv) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    previous = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    write_text = pathlib.Path.write_text

    def disk_full(self, *args, **kwargs):
        if self.name in ("metrics.json", "report.html"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    rc = mmia.cli.main(argv)
    printed = capsys.readouterr()
    line = _one_error_line(rc, printed.err, printed.out)
    assert rc in (1, 2) and "No space left on device" in line and "unchanged" in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
