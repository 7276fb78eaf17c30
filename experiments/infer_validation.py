"""Validate `mmia infer` against the pilot world's ground truth (issue 10, item 5).

Repetitions re-draw the known non-members and the candidates from cached features and call the
statistical core (`mmia.infer.infer_core`, `mmia.infer.shift_check`) directly; WSA is refitted
on each draw's own known non-members. Scenarios, each over --reps random draws:
  members     100 members (target training samples outside WSA's pool)
  null        100 i.i.d. non-members
  mixed-10/30/50  10 / 30 / 50 members among 100
  post-release    100 post-release (shifted) non-members, known non-members i.i.d.
  old-vs-new      100 i.i.d. non-members, known non-members post-release (a naive test says used)
Then `mmia infer` end to end on three whole pilot splits (the README's worked example).

Run:  python experiments/infer_validation.py [--reps 100] [--jobs 2]
          [--out experiments/results/infer_validation.md]
First run on a fresh clone: builds the pilot (as `mmia pilot` does) and embeds the train and
reference splits into the pilot's cache (several minutes on 2 cores); later runs reuse them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from scipy import stats

from mmia.attacks import AEA, CSA, WSA, Features
from mmia.attacks.blind import blind_design
from mmia.audit import drop_duplicate_content, features_of, split_known_nonmembers
from mmia.cache import EmbeddingCache
from mmia.embed import embed_shards
from mmia.infer import infer_core, shift_check
from mmia.model import load_model
from mmia.pilot import PILOT_WSA_LAMBDA

N_CANDIDATES = 100
# Known non-members per draw, and the share WSA holds out for its p-values, chosen so that every
# attack's calibration set n makes target_fpr * (n + 1) an integer: then the conformal flag
# rate floor(target_fpr * (n + 1)) / (n + 1) is exactly the target (csa, aea: 399 -> 4/400;
# wsa: 199 held out -> 2/200).
N_KNOWN = 399
WSA_CALIBRATION = 199
ALPHA = 0.05
TARGET_FPR = 0.01
ATTACKS = ("csa", "aea", "wsa")
# scenario -> (members among the candidates, where the non-members come from, known set)
SCENARIOS = {
    "members": (100, "iid", "iid"),
    "null": (0, "iid", "iid"),
    "mixed-10": (10, "iid", "iid"),
    "mixed-30": (30, "iid", "iid"),
    "mixed-50": (50, "iid", "iid"),
    "post-release": (0, "shifted", "iid"),
    "old-vs-new": (0, "iid", "shifted"),
}
SPLITS = {  # split -> (views, group)
    "train": (10, "members"), "eval_nonmembers": (10, "iid"), "known_nonmembers": (10, "iid"),
    "reference": (10, "iid"), "post_release": (10, "shifted"),
    "post_release_known": (10, "shifted"), "pool": (0, "pool"),
}


@dataclass
class Group:
    """One kind of sample (members, iid or shifted non-members, pool): what a draw needs."""

    features: Features  # image/text only (WSA)
    csa: np.ndarray
    aea: np.ndarray
    design: np.ndarray
    groups: list[str]

    def take(self, idx: np.ndarray) -> dict:
        return {"csa": self.csa[idx], "aea": self.aea[idx], "design": self.design[idx],
                "groups": [self.groups[i] for i in idx], "features": self.features.subset(idx)}


def load_groups(root: str) -> tuple[dict[str, Group], object, str]:
    """Embed (or read from the cache) every split the scenarios need, grouped by kind."""
    from mmia.world import DEFAULT_MODEL_CONFIG, build_pilot

    pilot = build_pilot(root, None, None, DEFAULT_MODEL_CONFIG, reference=False)
    loaded = load_model(pilot.model_name, str(pilot.target_ckpt), str(pilot.model_config),
                        device="cpu")
    cache_dir = os.path.join(root, "cache")
    cache = EmbeddingCache(cache_dir, loaded.fingerprint)
    parts: dict[str, list] = {}
    for split, (views, group) in SPLITS.items():
        result = embed_shards(loaded, pilot.world.urls(split), cache_dir, views=views,
                              progress=False)
        drop_duplicate_content(result)
        parts.setdefault(group, []).extend(result.records)  # SampleRecords (with image stats)
    pool_content = {r.image_digest for r in parts["pool"]}  # WSA trains on the pool
    parts["members"] = [r for r in parts["members"] if r.image_digest not in pool_content]
    groups = {}
    for name, records in parts.items():
        views = 0 if name == "pool" else 10
        f = features_of(records, cache, views)
        plain = Features(keys=f.keys, image=f.image, text=f.text, groups=f.groups)
        if name == "pool":  # WSA's unlabeled data: only its features are read
            groups[name] = Group(plain, np.empty(0), np.empty(0), np.empty((0, 0)), [])
            continue
        groups[name] = Group(plain, CSA().score(f), AEA().score(f), blind_design(f),
                             list(f.groups))
    return groups, pilot, cache_dir


def draw_candidates(rng: np.random.Generator, groups: dict[str, Group], n_members: int,
                    source: np.ndarray, source_group: str) -> tuple[dict, int]:
    """n_members members and N_CANDIDATES - n_members non-members from `source` indices."""
    members = rng.choice(len(groups["members"].csa), n_members, replace=False)
    others = rng.choice(source, N_CANDIDATES - n_members, replace=False)
    a, b = groups["members"].take(members), groups[source_group].take(others)
    merged = {k: np.concatenate([a[k], b[k]]) for k in ("csa", "aea", "design")}
    merged["groups"] = a["groups"] + b["groups"]
    merged["features"] = Features(
        keys=a["features"].keys + b["features"].keys,
        image=np.concatenate([a["features"].image, b["features"].image]),
        text=np.concatenate([a["features"].text, b["features"].text]))
    return merged, n_members


def known_draw(rng: np.random.Generator, group: Group, seed: int):
    """N_KNOWN known non-members, WSA fitted on its share of them; returns the rest's indices."""
    order = rng.permutation(len(group.csa))
    known_idx, rest = order[:N_KNOWN], order[N_KNOWN:]
    known = group.take(known_idx)
    fit, calibration = split_known_nonmembers(known["features"], WSA_CALIBRATION / N_KNOWN,
                                              seed)
    return known, rest, fit, calibration


def one_rep(groups: dict[str, Group], rep: int, seed: int) -> list[dict]:
    """Every scenario once, on fresh draws of known non-members and candidates."""
    rng = np.random.default_rng([seed, rep])
    draws = {kind: known_draw(rng, groups[kind], seed + rep) for kind in ("iid", "shifted")}
    wsa = {}
    for kind, (_, _, fit, calibration) in draws.items():
        model = WSA(lam=PILOT_WSA_LAMBDA, seed=seed + rep).fit(fit, groups["pool"].features)
        wsa[kind] = (model, model.score(calibration))
    rows = []
    for scenario, (n_members, source, known_kind) in SCENARIOS.items():
        known, rest, _, _ = draws[known_kind]
        pool = rest if source == known_kind else np.arange(len(groups[source].csa))
        cand, k = draw_candidates(rng, groups, n_members, pool, source)
        model, wsa_cal = wsa[known_kind]
        scores = {"csa": cand["csa"], "aea": cand["aea"], "wsa": model.score(cand["features"])}
        calibration = {"csa": known["csa"], "aea": known["aea"], "wsa": wsa_cal}
        design = np.concatenate([cand["design"], known["design"]])
        is_candidate = np.r_[np.ones(N_CANDIDATES), np.zeros(N_KNOWN)]
        shift = shift_check(design, is_candidate, cand["groups"] + known["groups"], seed + rep)
        tests, verdict = infer_core(scores, calibration, shift, ALPHA, TARGET_FPR)
        rows.append({
            "rep": rep, "scenario": scenario, "members": k, "verdict": verdict.verdict,
            "p": verdict.p_value, "bound": verdict.members_lower_bound,
            "shift_auc": shift.auc, "shift": shift.detected,
            "flags": {a: int(t.flagged[k:].sum()) for a, t in tests.items()},
            "n_cal": {a: int(t.calibration.size) for a, t in tests.items()}})
    return rows


def some_reps(groups: dict[str, Group], reps: list[int], seed: int) -> list[dict]:
    return [row for rep in reps for row in one_rep(groups, rep, seed)]


def run_reps(groups: dict[str, Group], reps: int, seed: int, jobs: int) -> list[dict]:
    """All draws, split over `jobs` processes; the result does not depend on `jobs`."""
    chunks = [list(range(reps))[i::jobs] for i in range(jobs)]
    done = Parallel(n_jobs=jobs)(delayed(some_reps)(groups, ids, seed) for ids in chunks if ids)
    rows = [row for chunk in done for row in chunk]
    return sorted(rows, key=lambda x: x["rep"])


def scenario_table(rows: list[dict], reps: int) -> list[str]:
    lines = ["| scenario | members / 100 | used | not detected | inconclusive | median p | "
             "bound ≤ truth | bound > 0 | mean bound | shift detected |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for scenario, (k, _, _) in SCENARIOS.items():
        r = [x for x in rows if x["scenario"] == scenario]
        count = {v: sum(x["verdict"] == v for x in r) for v in
                 ("used", "not_detected", "inconclusive")}
        bounds = np.array([x["bound"] for x in r])
        lines.append(
            f"| {scenario} | {k} | {count['used']} | {count['not_detected']} | "
            f"{count['inconclusive']} | {np.median([x['p'] for x in r]):.2g} | "
            f"{int((bounds <= k).sum())}/{len(r)} | {int((bounds > 0).sum())}/{len(r)} | "
            f"{bounds.mean():.1f} | {sum(x['shift'] for x in r)}/{len(r)} |")
    return lines


EXCHANGEABLE = ("null", "mixed-10", "mixed-30", "mixed-50")


def conformal_rate(n_cal: int, target: float = TARGET_FPR) -> float:
    """The flag rate p <= target gives a non-member exchangeable with n_cal calibration
    scores: floor(target (n_cal + 1)) / (n_cal + 1)."""
    return np.floor(target * (n_cal + 1) + 1e-9) / (n_cal + 1)


def per_rep_fpr(rows: list[dict], attack: str) -> np.ndarray:
    """Each draw's flag rate among its non-member candidates (the scenarios whose non-members
    are exchangeable with the known ones): one value per draw, since the candidates of one
    draw share its known non-members and are not independent."""
    reps = sorted({x["rep"] for x in rows})
    rates = []
    for rep in reps:
        r = [x for x in rows if x["rep"] == rep and x["scenario"] in EXCHANGEABLE]
        rates.append(sum(x["flags"][attack] for x in r)
                     / sum(N_CANDIDATES - x["members"] for x in r))
    return np.array(rates)


def flag_table(rows: list[dict]) -> tuple[list[str], dict]:
    """False-positive rate of the per-candidate flags against each attack's exact conformal
    rate, with a t interval over draws."""
    lines = ["| attack | calibration non-members n | exact conformal rate "
             "floor(0.01 (n+1))/(n+1) | non-member FPR, mean over draws | 95 % t interval over "
             "draws | exact rate inside |", "|---|---|---|---|---|---|"]
    ok = {}
    for a in ATTACKS:
        n_cal = rows[0]["n_cal"][a]
        exact = conformal_rate(n_cal)
        rates = per_rep_fpr(rows, a)
        mean, half = rates.mean(), stats.t.ppf(0.975, rates.size - 1) * stats.sem(rates)
        ok[a] = (n_cal, exact, mean - half <= exact <= mean + half)
        lines.append(f"| {a} | {n_cal} | {exact:.4f} | {mean:.4f} | "
                     f"[{mean - half:.4f}, {mean + half:.4f}] | {'yes' if ok[a][2] else 'no'} |")
    return lines, ok


def checks(rows: list[dict], reps: int, flags_ok: dict) -> list[str]:
    """The issue's four statements, each with its outcome."""
    by = {s: [x for x in rows if x["scenario"] == s] for s in SCENARIOS}
    used = {s: sum(x["verdict"] == "used" for x in r) for s, r in by.items()}
    small_p = sum(x["verdict"] == "used" and x["p"] < 0.001 for x in by["members"])
    margin = int(stats.binom.ppf(0.95, reps, ALPHA))
    cover = {s: sum(x["bound"] <= x["members"] for x in by[s]) / reps
             for s in ("null", "mixed-10", "mixed-30", "mixed-50")}
    positive = {s: sum(x["bound"] > 0 for x in by[s]) / reps for s in ("mixed-30", "mixed-50")}
    shifted = [x for s in ("post-release", "old-vs-new") for x in by[s]]

    def mark(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    others = [x for x in by["members"] if not (x["verdict"] == "used" and x["p"] < 0.001)]
    why = {v: sum(x["verdict"] == v for x in others) for v in ("used", "not_detected",
                                                                "inconclusive")}
    shifted_others = sum(x["shift"] for x in others)
    others_text = (f" (the other {len(others)}: " + ", ".join(
        f"{v.replace('_', ' ')} {c}" for v, c in why.items() if c)
        + f"; shift check fired in {shifted_others} of them)" if others else "")
    calibrations = ", ".join(f"{a} n = {n}, exact rate {rate:.4f}"
                             for a, (n, rate, _) in flags_ok.items())
    return [
        f"- {mark(small_p >= 0.9 * reps)} 100 members → used with p < 0.001 in "
        f"{small_p}/{reps} draws{others_text}.",
        f"- {mark(used['null'] <= margin)} 100 i.i.d. non-members → used in {used['null']}/"
        f"{reps} draws (α = {ALPHA}: at most {margin} expected with 95 % probability).",
        f"- {mark(all(ok for _, _, ok in flags_ok.values()))} flags' FPR: each attack's exact "
        f"conformal rate at --target-fpr {TARGET_FPR} ({calibrations}) lies inside the 95 % t "
        "interval of its per-draw FPR for "
        + ", ".join(a for a, (_, _, ok) in flags_ok.items() if ok)
        + (" (outside for " + ", ".join(a for a, (_, _, ok) in flags_ok.items() if not ok)
           + ")" if not all(ok for _, _, ok in flags_ok.values()) else "") + ".",
        f"- {mark(min(cover.values()) >= 0.95)} members' lower bound ≤ the true count in "
        + ", ".join(f"{cover[s]:.0%} ({s})" for s in cover) + " of draws (needs ≥ 95 %).",
        f"- {mark(min(positive.values()) > 0.5)} bound > 0 in "
        + ", ".join(f"{positive[s]:.0%} ({s})" for s in positive) + " of draws.",
        f"- {mark(all(x['verdict'] == 'inconclusive' for x in shifted))} shifted sets → never "
        f"used: post-release {used['post-release']}/{reps}, old-vs-new "
        f"{used['old-vs-new']}/{reps} used; inconclusive in "
        f"{sum(x['verdict'] == 'inconclusive' for x in shifted)}/{len(shifted)}.",
    ]


def worked_examples(pilot, cache_dir: str, out_root: str) -> tuple[list[str], list[str]]:
    """`mmia infer` end to end on whole pilot splits; returns (commands, result lines)."""
    import mmia.cli

    commands, lines = [], ["| candidates (truth) | verdict | p | members ≥ | shift AUC | "
                           "csa / aea / wsa flagged at 1 % FPR |", "|---|---|---|---|---|---|"]
    truth = {"eval_members": "members", "eval_nonmembers": "non-members",
             "post_release": "post-release non-members"}
    for split, what in truth.items():
        out = os.path.join(out_root, split)
        argv = ["infer", "--model", pilot.model_name, "--model-config", str(pilot.model_config),
                "--pretrained", str(pilot.target_ckpt), "--device", "cpu",
                "--candidates", *pilot.world.urls(split),
                "--known-nonmembers", *pilot.world.urls("known_nonmembers"),
                "--pool", *pilot.world.urls("pool"), "--wsa-lambda",
                str(PILOT_WSA_LAMBDA), "--cache", cache_dir, "--out", out, "--no-progress"]
        commands.append("mmia " + " ".join(argv))
        if mmia.cli.main(argv) != 0:
            raise SystemExit(f"mmia infer failed on {split}")
        v = json.loads(Path(out, "verdict.json").read_text())
        flags = " / ".join(str(v["attacks"][a]["n_flagged"]) for a in ATTACKS
                           if a in v["attacks"])
        lines.append(f"| {split} ({v['n_candidates']} {what}; "
                     f"{v['n_known_nonmembers']} known non-members) | {v['verdict']} | "
                     f"{v['p_value']:.2g} | "
                     f"{v['members_lower_bound']} | {v['shift_auc']:.3f} | {flags} |")
        lines.append(f"|  | *{v['sentence']}* | | | | |")
    return commands, lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".mmia/pilot")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--examples-out", default="mmia-out/infer")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    command = " ".join(["python", "experiments/infer_validation.py", *sys.argv[1:]])
    t0 = time.time()
    groups, pilot, cache_dir = load_groups(args.root)
    loaded_s = time.time() - t0
    rows = run_reps(groups, args.reps, args.seed, args.jobs)
    reps_s = time.time() - t0 - loaded_s
    flags, flags_ok = flag_table(rows)
    commands, examples = worked_examples(pilot, cache_dir, args.examples_out)
    sizes = ", ".join(f"{k} {len(g.features)}" for k, g in groups.items())
    text = "\n".join([
        f"Command: `{command}`", "",
        f"Pilot world `{pilot.root.name}` (WorldConfig(), TrainConfig(), mmia-tiny-vit); samples "
        f"drawn from: {sizes} (members: training samples outside WSA's pool). Each draw: "
        f"{N_KNOWN} known non-members (WSA fitted on {N_KNOWN - WSA_CALIBRATION} of them with "
        f"λ = {PILOT_WSA_LAMBDA}, p-values from the other {WSA_CALIBRATION}) and "
        f"{N_CANDIDATES} candidates; attacks "
        f"{', '.join(ATTACKS)}; α = {ALPHA}, target FPR {TARGET_FPR}; {args.reps} draws per "
        f"scenario, seed {args.seed}.", "",
        "## Verdicts over repeated draws", "", *scenario_table(rows, args.reps), "",
        "## Per-candidate flags", "", *flags, "",
        "## The issue's statements", "", *checks(rows, args.reps, flags_ok), "",
        "## Worked example: `mmia infer` on whole pilot splits", "",
        "Known non-members: the `known_nonmembers` split; pool: the `pool` split.", "",
        *examples, "", "Commands:", "", "```", *commands, "```", "",
        f"Time: features {loaded_s:.0f} s, draws {reps_s:.0f} s ({args.jobs} processes), "
        f"total {time.time() - t0:.0f} s ({platform.machine()}, {os.cpu_count()} cores). "
        "WSA's MLP and the shift check's logistic regression may move in their last digits on a "
        "CPU whose BLAS rounds differently.",
    ]) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
