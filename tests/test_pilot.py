"""`mmia pilot` end to end on a tiny world and model, and its flags."""

from __future__ import annotations

import json

import pytest
from test_world import TINY

from mmia.attacks.wsa import AUTO_LAMBDAS
from mmia.cli import build_parser
from mmia.errors import MmiaError
from mmia.pilot import (
    PILOT_ATTACKS,
    PilotSettings,
    pilot_configs,
    pool_precision,
    run_pilot,
)
from mmia.world import TrainConfig, WorldConfig

SETTINGS = PilotSettings(views=2, n_bootstrap=20, progress=False, references=2, mcd_passes=2)
TRAIN = TrainConfig(epochs=2, batch_size=30, lr=2e-3, warmup_steps=1)


@pytest.fixture(scope="module")
def pilot_run(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("pilot")
    result = run_pilot(str(root / "state"), str(root / "out"), SETTINGS, TINY, TRAIN, tiny_config)
    assert not (root / "out").exists()  # the API writes nothing by itself
    result.write(str(root / "out"), "mmia pilot (test)")
    return root, result.text


def test_pilot_prints_both_protocols_and_writes_reports(pilot_run):
    root, text = pilot_run
    rows = [line.split("|")[1:3] for line in text.splitlines() if line.startswith("| ")][1:]
    got = {(p.strip(), a.strip()) for p, a in rows}
    assert got == {(p, a) for p in ("iid", "post-release") for a in PILOT_ATTACKS}
    assert text.count("pseudo-members, precision") == 2
    assert "tpr@0.1%fpr: with 20 evaluation non-members" in text  # TINY has 20 of each
    for protocol in ("iid", "post-release"):
        metrics = json.loads((root / "out" / protocol / "metrics.json").read_text())
        assert metrics["attacks"]["csa"]["n_members"] == TINY.n_eval
        assert metrics["settings"]["wsa_lambda"] == "auto"
        assert metrics["attacks"]["wsa"]["wsa_lambda"] in AUTO_LAMBDAS
        refs = metrics["settings"]["references"]  # rcsa: two references on reference halves
        assert [r["pretrained"].rsplit("/", 1)[-1] for r in refs] == \
            ["reference-half-0.pt", "reference-half-1.pt"]
        assert len({r["fingerprint"] for r in refs} | {metrics["model"]["fingerprint"]}) == 3


def test_pilot_reuses_its_world_and_cache(pilot_run, tiny_config, capsys):
    root, text = pilot_run
    again = run_pilot(str(root / "state"), str(root / "out2"), SETTINGS, TINY, TRAIN, tiny_config)
    embeds = [e for audit in again.audits.values() for e in audit.embed.values()]
    assert embeds and all(e.embedded == 0 and e.cached > 0 for e in embeds)  # all cached
    assert capsys.readouterr().out == ""  # the API prints nothing
    strip = [line for line in again.text.splitlines() if not line.startswith("world+target")]
    assert strip == [line for line in text.splitlines() if not line.startswith("world+target")]


def test_pool_precision_matches_raw_keys_against_ground_truth():
    truth = {"000010001": True, "000010002": False, "000010003": True}
    assert pool_precision(["pool/00001/000010001", "pool/00001/000010002"], truth) == 0.5
    assert pool_precision(["x/000010003"], truth) == 1.0
    assert pool_precision(["x/unknown"], truth) is None


def _pilot_args(*argv: str) -> tuple:
    args = build_parser().parse_args(["pilot", *argv])
    return args.members, args.epochs, args.world_seed, args.idio_strength, args.shift_strength


def test_pilot_flags_make_the_world_and_training_configs():
    world, train = pilot_configs(*_pilot_args())
    assert world == WorldConfig() and train == TrainConfig()
    world, train = pilot_configs(*_pilot_args("--members", "300", "--epochs", "3",
                                             "--world-seed", "7", "--idio-strength", "0.1",
                                             "--shift-strength", "0.2"))
    assert (world.n_members, world.n_eval, world.n_pool_members) == (300, 100, 50)
    assert (world.seed, world.idio_strength, world.shift_strength) == (7, 0.1, 0.2)
    assert (train.epochs, train.seed) == (3, 7)
    with pytest.raises(MmiaError, match="--members"):
        pilot_configs(*_pilot_args("--members", "10"))
