"""`mmia pilot`: the embedded default study on the synthetic world.

Builds (or reuses) the pilot world and its locally trained target CLIP, then runs the
CSA/AEA/WSA comparison — with the blind baseline beside it — under two protocols:
- iid: evaluation non-members drawn from the members' distribution (measures leakage);
- post-release: shifted non-members, like Ko et al.'s LAION-vs-CC setup (measures shift too).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass, replace

import numpy as np

from mmia.audit import AuditConfig, format_table, run_audit
from mmia.errors import MmiaError
from mmia.model import load_model
from mmia.report import console_notes

PROTOCOLS = {
    # protocol: (evaluation non-members, attacker's known non-members)
    "iid": ("eval_nonmembers", "known_nonmembers"),
    "post-release": ("post_release", "post_release_known"),
}
PILOT_WSA_LAMBDA = 0.5


@dataclass(frozen=True)
class PilotSettings:
    """What `mmia pilot` runs besides the world: attacks and their parameters."""

    attacks: tuple[str, ...] = ("csa", "aea", "wsa", "blind")
    views: int = 10
    seed: int = 0
    n_bootstrap: int = 1000
    wsa_lambda: float = PILOT_WSA_LAMBDA
    progress: bool = True


def pool_precision(pseudo_keys: list[str], truth: dict[str, bool]) -> float | None:
    """Fraction of WSA pseudo-members that are true members (keys matched by raw key)."""
    flags = [truth.get(k.rsplit("/", 1)[-1]) for k in pseudo_keys]
    flags = [f for f in flags if f is not None]
    return float(np.mean(flags)) if flags else None


def run_pilot(root: str, out: str, settings: PilotSettings | None = None,
              world_cfg=None, train_cfg=None, model_config: str | None = None) -> str:
    """Build or reuse the pilot, audit it under both protocols; return the printed text.

    world_cfg / train_cfg / model_config default to the embedded pilot (WorldConfig(),
    TrainConfig(), mmia-tiny-vit).
    """
    from mmia.world import DEFAULT_MODEL_CONFIG, build_pilot, read_ground_truth

    settings = settings or PilotSettings()
    start = time.perf_counter()
    print("building or reusing the pilot world and target model …", file=sys.stderr)
    pilot = build_pilot(root, world_cfg, train_cfg, model_config or DEFAULT_MODEL_CONFIG,
                        reference=False)  # no attack uses the reference model yet
    built = time.perf_counter() - start
    loaded = load_model(pilot.model_name, str(pilot.target_ckpt), str(pilot.model_config),
                        device="cpu")
    truth = {k: bool(v["member"]) for k, v in read_ground_truth(pilot.world.root).items()}
    rows, extra = [], []
    for protocol, (nonmembers, known) in PROTOCOLS.items():
        cfg = AuditConfig(
            members=pilot.world.urls("eval_members"), nonmembers=pilot.world.urls(nonmembers),
            known_nonmembers=pilot.world.urls(known), pool=pilot.world.urls("pool"),
            attacks=settings.attacks, cache=os.path.join(root, "cache"),
            out=os.path.join(out, protocol), views=settings.views, seed=settings.seed,
            n_bootstrap=settings.n_bootstrap, wsa_lambda=settings.wsa_lambda,
            progress=settings.progress)
        result = run_audit(loaded, cfg, command=f"mmia pilot (protocol {protocol})")
        rows += [(protocol, name, m) for name, m in result.metrics.items()]
        if "wsa" in result.metrics:
            prec = pool_precision(result.wsa_pseudo_member_keys, truth)
            wsa = result.metrics["wsa"]
            extra.append(
                f"{protocol}: WSA threshold {wsa['wsa_threshold']:.3f} = known non-members' CSA "
                f"mean {wsa['wsa_known_csa_mean']:.3f} + {settings.wsa_lambda:g} × std "
                f"{wsa['wsa_known_csa_std']:.3f}; picked {wsa['n_pseudo_members']} of "
                f"{len(pilot.world.keys['pool'])} pool samples as pseudo-members, precision "
                f"{'n/a' if prec is None else f'{prec:.2f}'}")
        extra += [f"{protocol}: {note}" for note in result.notes]
        extra += [f"{protocol}: {line}" for line in console_notes(result.metrics)]
    lines = [format_table(rows), "", *extra,
             f"world+target ready in {built:.0f} s; total {time.perf_counter() - start:.0f} s "
             f"({platform.machine()}, {os.cpu_count()} cores); "
             f"reports in {out}/<protocol>/report.html"]
    return "\n".join(lines)


def add_pilot_parser(sub) -> None:
    from mmia.world import TrainConfig, WorldConfig

    world, train = WorldConfig(), TrainConfig()
    p = sub.add_parser("pilot", help="run the default study on the synthetic pilot world")
    p.add_argument("--root", default=".mmia/pilot", help="where the world, models, cache live")
    p.add_argument("--out", default="mmia-out/pilot")
    p.add_argument("--attacks", default="csa,aea,wsa,blind")
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="attack and bootstrap seed")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--wsa-lambda", type=float, default=PILOT_WSA_LAMBDA,
                   help="pseudo-member threshold μ + λσ (default 0.5 here: the known non-members' "
                        "cosines are skewed and at the paper's 1.5 μ + λσ exceeds 1)")
    g = p.add_argument_group("world and target (a new combination builds a new world)")
    g.add_argument("--world-seed", type=int, default=world.seed,
                   help="seed of the world and of the target's training")
    g.add_argument("--members", type=int, default=world.n_members,
                   help="target training-set size")
    g.add_argument("--epochs", type=int, default=train.epochs)
    g.add_argument("--idio-strength", type=float, default=world.idio_strength,
                   help="weight of each image's memorisable texture (0 = none)")
    g.add_argument("--model-config", help="open_clip model-config JSON of the target "
                   "(default: the embedded mmia-tiny-vit)")
    g.add_argument("--shift-strength", type=float, default=world.shift_strength,
                   help="post-release shift: share of attributes from a new vocabulary")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cli_pilot)


def pilot_configs(args: argparse.Namespace):
    """WorldConfig and TrainConfig from the pilot's flags (evaluation splits shrink to fit)."""
    from mmia.world import TrainConfig, WorldConfig

    world = WorldConfig()
    if args.members < 30 or args.epochs < 1:
        raise MmiaError("--members must be ≥ 30 and --epochs ≥ 1")
    n_eval = min(world.n_eval, args.members // 3)
    world = replace(world, seed=args.world_seed, n_members=args.members, n_eval=n_eval,
                    n_pool_members=min(world.n_pool_members, args.members // 6),
                    idio_strength=args.idio_strength, shift_strength=args.shift_strength)
    return world, replace(TrainConfig(), seed=args.world_seed, epochs=args.epochs)


def cli_pilot(args: argparse.Namespace) -> int:
    from mmia.audit import parse_attacks

    settings = PilotSettings(attacks=parse_attacks(args.attacks), views=args.views,
                             seed=args.seed, n_bootstrap=args.bootstrap,
                             wsa_lambda=args.wsa_lambda, progress=not args.no_progress)
    world_cfg, train_cfg = pilot_configs(args)
    if args.model_config and not os.path.isfile(args.model_config):
        raise MmiaError(f"model config {args.model_config!r} does not exist: pass a JSON file")
    text = run_pilot(args.root, args.out, settings, world_cfg, train_cfg, args.model_config)
    with open(os.path.join(args.out, "pilot.md"), "w") as f:
        f.write(f"Command: `{args.command_line}`\n\n{text}\n")
    print(text)
    return 0
