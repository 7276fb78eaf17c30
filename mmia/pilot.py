"""`mmia pilot`: the embedded default study on the synthetic world.

Builds (or reuses) the pilot world and its locally trained target CLIP, then runs the
CSA/AEA/WSA comparison — with the blind baseline beside it — under two protocols:
- iid: evaluation non-members drawn from the members' distribution (measures leakage);
- post-release: shifted non-members, like Ko et al.'s LAION-vs-CC setup (measures shift too).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass, replace

import numpy as np

from mmia.attacks.mcd import DEFAULT_STATISTIC
from mmia.attacks.rcsa import DEFAULT_CALIBRATION
from mmia.audit import AuditConfig, AuditResult, check_companion_settings, format_table, run_audit
from mmia.checks import check_attack_settings, check_int, check_seed
from mmia.modelref import ModelRequest
from mmia.report import console_notes
from mmia.variants import MCD_DROPOUT, MCD_PASSES

PROTOCOLS = {
    # protocol: (evaluation non-members, attacker's known non-members)
    "iid": ("eval_nonmembers", "known_nonmembers"),
    "post-release": ("post_release", "post_release_known"),
}
PILOT_ATTACKS = ("csa", "aea", "wsa", "blind", "rcsa", "mcd", "loss", "grad")
PILOT_REFERENCES = 4
PILOT_WSA_LAMBDA = "auto"  # the pilot's skewed cosines put the paper's μ + 1.5σ near or above 1
log = logging.getLogger(__name__)
REPRODUCIBILITY = (
    "reproducibility: every row is seeded and repeats exactly on one machine; csa and aea are "
    "plain functions of the cached features, while wsa (an MLP trained by Adam) and blind "
    "(logistic regression) fit classifiers on one BLAS thread: on a CPU whose BLAS kernels round "
    "differently, their last digits may move, and every row may if the target's CPU training "
    "rounds differently")


@dataclass(frozen=True)
class PilotSettings:
    """What `mmia pilot` runs besides the world: attacks and their parameters."""

    attacks: tuple[str, ...] = PILOT_ATTACKS
    views: int = 10
    seed: int = 0
    n_bootstrap: int = 1000
    wsa_lambda: float | str = PILOT_WSA_LAMBDA
    wsa_features: str = "concat"
    progress: bool = False
    references: int = PILOT_REFERENCES  # rcsa's reference models, each on half the reference split
    rcsa_calibration: str = DEFAULT_CALIBRATION
    mcd_passes: int = MCD_PASSES
    mcd_dropout: float = MCD_DROPOUT
    mcd_statistic: str = DEFAULT_STATISTIC

    def __post_init__(self) -> None:
        check_attack_settings(self.views, self.seed, self.n_bootstrap, self.wsa_lambda)
        check_int("--references", self.references, 0)
        check_companion_settings(self.rcsa_calibration, self.mcd_passes, self.mcd_dropout,
                                 self.mcd_statistic)


def wsa_lambda_text(wsa: dict) -> str:
    """λ as WSA used it: "1.5", or "0.5 (auto: largest of the grid picking ≥ 20)"."""
    if not wsa.get("wsa_lambda_auto"):
        return f"{wsa['wsa_lambda']:g}"
    k = wsa["wsa_min_pseudo_members"]
    why = (f"largest of the grid picking ≥ {k}" if wsa["n_pseudo_members"] >= k
           else f"no λ of the grid picks {k}; the smallest picks the most")
    return f"{wsa['wsa_lambda']:g} (auto: {why})"


def pool_precision(pseudo_keys: list[str], truth: dict[str, bool]) -> float | None:
    """Fraction of WSA pseudo-members that are true members (keys matched by raw key)."""
    flags = [truth.get(k.rsplit("/", 1)[-1]) for k in pseudo_keys]
    flags = [f for f in flags if f is not None]
    return float(np.mean(flags)) if flags else None


@dataclass
class PilotResult:
    """The audits of both protocols and the summary text `mmia pilot` prints."""

    audits: dict[str, AuditResult]
    text: str

    def write(self, out: str, command: str = "") -> None:
        """Write each protocol's report to out/<protocol>/ and the summary to out/pilot.md."""
        for protocol, audit in self.audits.items():
            audit.write(os.path.join(out, protocol))
        with open(os.path.join(out, "pilot.md"), "w") as f:
            f.write(f"Command: `{command}`\n\n{self.text}\n")


def run_pilot(root: str, out: str, settings: PilotSettings | None = None,
              world_cfg=None, train_cfg=None, model_config: str | None = None) -> PilotResult:
    """Build or reuse the pilot and audit it under both protocols; writes nothing.

    world_cfg / train_cfg / model_config default to the embedded pilot (WorldConfig(),
    TrainConfig(), mmia-tiny-vit); `out` only names where `PilotResult.write` puts reports.
    """
    from mmia.model import load_model
    from mmia.world import DEFAULT_MODEL_CONFIG, build_pilot, read_ground_truth

    settings = settings or PilotSettings()
    start = time.perf_counter()
    log.info("building or reusing the pilot world and target model …")
    references = settings.references if "rcsa" in settings.attacks else 0
    pilot = build_pilot(root, world_cfg, train_cfg, model_config or DEFAULT_MODEL_CONFIG,
                        reference=False, half_references=references)
    built = time.perf_counter() - start
    loaded = load_model(pilot.model_name, str(pilot.target_ckpt), str(pilot.model_config),
                        device="cpu")
    reference_requests = tuple(
        ModelRequest(pilot.model_name, str(ckpt), str(pilot.model_config), "cpu")
        for ckpt in pilot.half_reference_ckpts)
    truth = {k: bool(v["member"]) for k, v in read_ground_truth(pilot.world.root).items()}
    rows, extra, audits = [], [], {}
    for protocol, (nonmembers, known) in PROTOCOLS.items():
        cfg = AuditConfig(
            members=pilot.world.urls("eval_members"), nonmembers=pilot.world.urls(nonmembers),
            known_nonmembers=pilot.world.urls(known), pool=pilot.world.urls("pool"),
            attacks=settings.attacks, cache=os.path.join(root, "cache"),
            out=os.path.join(out, protocol), views=settings.views, seed=settings.seed,
            n_bootstrap=settings.n_bootstrap, wsa_lambda=settings.wsa_lambda,
            wsa_features=settings.wsa_features, progress=settings.progress,
            references=reference_requests, rcsa_calibration=settings.rcsa_calibration,
            mcd_passes=settings.mcd_passes, mcd_dropout=settings.mcd_dropout,
            mcd_statistic=settings.mcd_statistic)
        result = audits[protocol] = run_audit(loaded, cfg,
                                              command=f"mmia pilot (protocol {protocol})")
        rows += [(protocol, name, m) for name, m in result.metrics.items()]
        if "wsa" in result.metrics:
            prec = pool_precision(result.wsa_pseudo_member_keys, truth)
            wsa = result.metrics["wsa"]
            extra.append(
                f"{protocol}: WSA threshold {wsa['wsa_threshold']:.3f} = known non-members' CSA "
                f"mean {wsa['wsa_known_csa_mean']:.3f} + {wsa_lambda_text(wsa)} × std "
                f"{wsa['wsa_known_csa_std']:.3f} (on {wsa['n_known_nonmembers_fit']} of them; "
                f"its decision threshold comes from the other {wsa['n_calibration']}); picked "
                f"{wsa['n_pseudo_members']} of {len(pilot.world.keys['pool'])} pool samples "
                f"as pseudo-members, precision {'n/a' if prec is None else f'{prec:.2f}'}")
        extra += [f"{protocol}: {note}" for note in result.notes]
        extra += [f"{protocol}: {line}" for line in console_notes(result.metrics)]
    lines = [format_table(rows), "", *extra, REPRODUCIBILITY,
             f"world+target ready in {built:.0f} s; total {time.perf_counter() - start:.0f} s "
             f"({platform.machine()}, {os.cpu_count()} cores); "
             f"reports in {out}/<protocol>/report.html"]
    return PilotResult(audits, "\n".join(lines))


def pilot_configs(members: int | None = None, epochs: int | None = None,
                  world_seed: int | None = None, idio_strength: float | None = None,
                  shift_strength: float | None = None):
    """WorldConfig and TrainConfig of the pilot with these knobs changed (None: default);
    the evaluation splits shrink to fit a small training set."""
    from mmia.world import TrainConfig, WorldConfig

    world, train = WorldConfig(), TrainConfig()
    members = world.n_members if members is None else members
    epochs = train.epochs if epochs is None else epochs
    seed = world.seed if world_seed is None else world_seed
    check_int("--members", members, 30)
    check_int("--epochs", epochs, 1)
    check_seed(seed, "--world-seed")
    world = replace(
        world, seed=seed, n_members=members, n_eval=min(world.n_eval, members // 3),
        n_pool_members=min(world.n_pool_members, members // 6),
        idio_strength=world.idio_strength if idio_strength is None else idio_strength,
        shift_strength=world.shift_strength if shift_strength is None else shift_strength)
    return world, replace(train, seed=seed, epochs=epochs)
