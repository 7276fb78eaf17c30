"""Every attack on three pilot worlds under both protocols: which one wins under i.i.d.?

Runs `mmia pilot` (world seeds 0, 1, 2 by default; each builds or reuses its world, target and
reference models under --root) with every attack, then the variants of rcsa and mcd on the
same warm cache, and writes a markdown table: AUC and the TPR at the threshold calibrated on
known non-members for 1 % FPR, each with its 95 % interval, the achieved FPR, and the cost in
model forward passes per audited pair.

    python experiments/compare_attacks.py --out experiments/results/attack_comparison.md

Last line: `winner_iid=… tpr_winner=… tpr_csa=… ratio=… separated_seeds=…`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace

import numpy as np

from mmia.pilot import PILOT_ATTACKS, PROTOCOLS, PilotSettings, pilot_configs, run_pilot

# (row label, attacks to run, settings changed from the pilot's defaults)
VARIANTS = (
    ("rcsa (offset)", ("rcsa",), {"rcsa_calibration": "offset"}),
    ("rcsa (z)", ("rcsa",), {"rcsa_calibration": "z"}),
    ("mcd (neg_std)", ("mcd",), {"mcd_statistic": "neg_std"}),
    ("mcd (mean_std)", ("mcd",), {"mcd_statistic": "mean_std"}),
    ("wsa (concat_cos)", ("wsa",), {"wsa_features": "concat_cos"}),
)


def passes_per_pair(name: str, settings: PilotSettings) -> str:
    """Forward passes of a model per audited pair (image and caption each count one)."""
    base = name.split(" ")[0]
    return {"csa": "1", "aea": f"1 + {settings.views} image views",
            "wsa": "1 (+ the pool)", "blind": "0 (no model)",
            "rcsa": f"1 + {settings.references} references",
            "mcd": f"1 + {settings.mcd_passes} dropout passes",
            "loss": "2 (white-box: + projection norms)",
            "grad": "2 (white-box: + projection norms)"}[base]


def interval(m: dict, key: str) -> str:
    ci = m.get("ci95", {}).get(key)
    return f"{m[key]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def run_world(root: str, seed: int, settings: PilotSettings) -> dict:
    """{protocol: {row label: metrics}} for one world seed."""
    world_cfg, train_cfg = pilot_configs(world_seed=seed)
    out = os.path.join(root, "compare-out")
    found: dict[str, dict] = {p: {} for p in PROTOCOLS}
    result = run_pilot(root, out, settings, world_cfg, train_cfg)
    for protocol, audit in result.audits.items():
        found[protocol].update(audit.metrics)
    for label, attacks, changes in VARIANTS:
        variant = replace(settings, attacks=attacks, **changes)
        for protocol, audit in run_pilot(root, out, variant, world_cfg, train_cfg).audits.items():
            if attacks[0] in audit.metrics:
                found[protocol][label] = audit.metrics[attacks[0]]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".mmia/pilot")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args()
    start = time.perf_counter()
    settings = PilotSettings(attacks=PILOT_ATTACKS)
    results = {s: run_world(args.root, s, settings) for s in args.seeds}
    labels = list(PILOT_ATTACKS) + [label for label, _, _ in VARIANTS]
    command = " ".join(["python", "experiments/compare_attacks.py", *sys.argv[1:]])
    lines = [f"Command: `{command}`", "",
             f"Pilot worlds with seeds {args.seeds} (default pilot config; the target and "
             f"{settings.references} reference models, each on its own random half of the "
             "reference split, trained per world). TPR cal. = TPR at the threshold set on "
             "known non-members for 1 % FPR (achieved FPR beside it), Clopper-Pearson "
             "intervals; AUC with DeLong intervals. iid: evaluation non-members from the "
             "members' distribution (measures memorisation); post-release: shifted non-members "
             "(measures shift too: see the blind row).", ""]
    for protocol in PROTOCOLS:
        lines += [f"### {protocol}", "",
                  "| attack | passes per pair | " + " | ".join(
                      f"seed {s}: AUC / TPR cal. / FPR" for s in args.seeds)
                  + " | mean AUC | mean TPR cal. |",
                  "|---|---|" + "---|" * len(args.seeds) + "---|---|"]
        for label in labels:
            ms = [results[s][protocol].get(label) for s in args.seeds]
            if any(m is None for m in ms):
                lines.append(f"| {label} | – | " + " | ".join(
                    "skipped" if m is None else "" for m in ms) + " | | |")
                continue
            cells = [f"{interval(m, 'auc')} / {interval(m, 'tpr_at_threshold')} / "
                     f"{m['achieved_fpr']:.3f}" for m in ms]
            lines.append(
                f"| {label} | {passes_per_pair(label, settings)} | " + " | ".join(cells)
                + f" | {np.mean([m['auc'] for m in ms]):.3f} | "
                f"{np.mean([m['tpr_at_threshold'] for m in ms]):.3f} |")
        lines.append("")
    # the winner is picked among the attacks as they run by default (their defaults were set
    # on world seed 0 before this table; the variants are shown, not candidates: picking the
    # best of many rows on the same seeds would flatter it)
    iid = {label: [results[s]["iid"].get(label) for s in args.seeds] for label in PILOT_ATTACKS}
    iid = {k: v for k, v in iid.items() if all(m is not None for m in v) and k != "blind"}
    winner = max(iid, key=lambda k: np.mean([m["tpr_at_threshold"] for m in iid[k]]))
    tpr_w = float(np.mean([m["tpr_at_threshold"] for m in iid[winner]]))
    tpr_c = float(np.mean([m["tpr_at_threshold"] for m in iid["csa"]]))
    separated = sum(w["ci95"]["tpr_at_threshold"][0] > c["ci95"]["tpr_at_threshold"][1]
                    for w, c in zip(iid[winner], iid["csa"], strict=True))
    ratio = tpr_w / tpr_c if tpr_c > 0 else float("inf")
    lines += [f"Under iid the highest mean calibrated TPR at 1 % FPR among the attacks with "
              f"their default settings is **{winner}**: {tpr_w:.3f} against CSA's {tpr_c:.3f} "
              f"({ratio:.1f}×); its interval lies above CSA's on {separated} of "
              f"{len(args.seeds)} seeds. The defaults (rcsa's offset calibration among others) "
              "were chosen on world seed 0; seeds 1 and 2 are fresh worlds, targets and "
              "references. The variant rows are shown for comparison, not as candidates.",
              f"Machine: {platform.machine()}, {os.cpu_count()} cores; "
              f"{time.perf_counter() - start:.0f} s (worlds and models built or reused).", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(f"winner_iid={winner.replace(' ', '_')} tpr_winner={tpr_w:.3f} tpr_csa={tpr_c:.3f} "
          f"ratio={ratio:.2f} separated_seeds={separated}")


if __name__ == "__main__":
    main()
