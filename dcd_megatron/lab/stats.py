"""Noise-aware summaries of the lab's runs: seed means and stds, binomial errors, paired differences vs SFT.

Pure functions over the per-run records that `jobs.distill_job` returns.
"""

from __future__ import annotations

import math
import statistics


def binomial_se(correct: int, n: int) -> float:
    """Standard error of an accuracy estimated from n problems (0 when n is 0)."""
    if n <= 0:
        return 0.0
    p = correct / n
    return math.sqrt(p * (1 - p) / n)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (std 0 for a single value, NaN mean for none)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def pooled(accuracy: dict[str, dict], ks: list[int]) -> tuple[int, int]:
    """(correct, n) over the problems of the given digit counts."""
    correct = sum(accuracy[str(k)]["correct"] for k in ks if str(k) in accuracy)
    n = sum(accuracy[str(k)]["n"] for k in ks if str(k) in accuracy)
    return correct, n


def style_share(accuracy: dict[str, dict], ks: list[int], style: str) -> float:
    """Share of greedy outputs written in `style` over the given digit counts."""
    n = sum(accuracy[str(k)]["n"] for k in ks if str(k) in accuracy)
    hits = sum(accuracy[str(k)]["styles"].get(style, 0) for k in ks if str(k) in accuracy)
    return hits / n if n else math.nan


def verdict(diff_mean: float, se: float) -> str:
    """`better` / `worse` when the paired mean difference is beyond 2 standard errors, else `tie`."""
    if not math.isfinite(diff_mean):
        return "n/a"
    if diff_mean > 2 * se:
        return "better"
    if diff_mean < -2 * se:
        return "worse"
    return "tie"


def summarize(records: list[dict], arms: list[str], groups: dict[str, list[int]], reference: str = "sft") -> dict:
    """Per arm and group: accuracy mean/std over seeds, binomial SE, and differences paired by seed.

    The paired difference's standard error is the larger of the seed-to-seed one (std/sqrt(n))
    and the binomial one (per-seed SEs of both arms combined, averaged, over sqrt(n)).
    """
    by_arm: dict[str, dict[int, dict]] = {}
    for rec in records:
        by_arm.setdefault(rec["arm"], {})[rec["seed"]] = rec
    ref = by_arm.get(reference, {})
    all_ks = sorted({int(k) for rec in records for k in rec["accuracy"]})
    out: dict = {}
    for arm in arms:
        runs = by_arm.get(arm, {})
        seeds = sorted(runs)
        entry: dict = {"seeds": seeds, "groups": {}, "ks": {}}
        cells = [("groups", name, ks) for name, ks in groups.items()]
        cells += [("ks", str(k), [k]) for k in all_ks]
        for where, name, ks in cells:
            accs, ses, diffs, diff_ses = [], [], [], []
            for s in seeds:
                c, n = pooled(runs[s]["accuracy"], ks)
                if n == 0:
                    continue
                accs.append(c / n)
                ses.append(binomial_se(c, n))
                if s in ref:
                    rc, rn = pooled(ref[s]["accuracy"], ks)
                    if rn:
                        diffs.append(c / n - rc / rn)
                        diff_ses.append(math.hypot(binomial_se(c, n), binomial_se(rc, rn)))
            m, sd = mean_std(accs)
            dm, dsd = mean_std(diffs)
            n_pairs = len(diffs)
            se = max(dsd / math.sqrt(n_pairs), statistics.fmean(diff_ses) / math.sqrt(n_pairs)) if n_pairs else math.nan
            stats = {
                "mean": m, "std": sd, "binomial_se": statistics.fmean(ses) if ses else math.nan,
                "diff_mean": dm, "diff_std": dsd, "diff_se": se, "pairs": n_pairs,
                "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs),
                "verdict": "reference" if arm == reference else verdict(dm, se),
            }
            entry[where][name] = stats
        for name, ks in groups.items():
            entry["groups"][name]["verbose_share"] = mean_std(
                [style_share(runs[s]["accuracy"], ks, "verbose") for s in seeds])
        entry["exposure"] = mean_std([(runs[s]["exposure"] or {}).get("ex_acc_err_pct", math.nan) for s in seeds])
        entry["final_ce"] = mean_std([runs[s]["final"].get("ce", math.nan) for s in seeds])
        entry["final_ess"] = mean_std([runs[s]["final"].get("ess", math.nan) for s in seeds])
        entry["weights"] = {}
        for when in ("init", "final"):
            styles = sorted({st for s in seeds for st in runs[s][f"weights_{when}"]})
            entry["weights"][when] = {
                st: {key: mean_std([runs[s][f"weights_{when}"].get(st, {}).get(key, math.nan) for s in seeds])[0]
                     for key in ("mean", "branch", "log_ratio_branch")}
                for st in styles
            }
        entry["prize"] = (
            arm != reference
            and entry["groups"].get("known", {}).get("verdict") == "better"
            and entry["groups"].get("new", {}).get("verdict") in ("better", "tie")
        )
        out[arm] = entry
    return out


def list_schedule(durations: list[float], workers: int) -> float:
    """Makespan of running jobs in the given order, each on the first free of `workers` workers."""
    free = [0.0] * max(1, workers)
    for d in durations:
        i = free.index(min(free))
        free[i] += d
    return max(free)


def idle_wall_estimate(cpu: dict, workers: int) -> float:
    """Wall time the lab would take on `workers` otherwise idle cores, from each job's CPU seconds.

    Stages run one after another (conservative: the priors' overlap with sampling is ignored);
    inside a stage the jobs are list-scheduled in submission order. `cpu` holds `main_s`,
    `worker_init_s`, `teacher_s`, `priors_s` (list), `sampling_s` and `jobs_s` (list: references
    and arms).
    """
    return (cpu["main_s"] + cpu["worker_init_s"]
            + list_schedule([cpu["teacher_s"], *cpu["priors_s"]], workers)
            + cpu["sampling_s"]
            + list_schedule(cpu["jobs_s"], workers))


NOT_CANDIDATES = ("sft", "oracle")  # the reference, and a filter that needs to know the student's style
GUARD_CONDITIONS = ("skip_heavy",)  # conditions where a default need only not lose to SFT
GOAL_NEW, GOAL_KNOWN = 0.5, 0.8  # the default's goal: these shares of the oracle's gain elsewhere


def oracle_share(summary: dict, arm: str, group: str, oracle: str = "oracle") -> float:
    """The arm's paired gain over SFT on `group` as a fraction of the oracle filter's (NaN without one)."""
    mine = summary.get(arm, {}).get("groups", {}).get(group, {}).get("diff_mean", math.nan)
    theirs = summary.get(oracle, {}).get("groups", {}).get(group, {}).get("diff_mean", math.nan)
    return mine / theirs if math.isfinite(theirs) and theirs > 0 else math.nan


def _goal_missed(summaries: dict[str, dict], arm: str) -> list[str]:
    """What of the default's goal the arm misses (empty: it reaches it)."""
    missed = []
    for name, summary in summaries.items():
        if name in GUARD_CONDITIONS:
            continue
        for group, goal in (("new", GOAL_NEW), ("known", GOAL_KNOWN)):
            share = oracle_share(summary, arm, group)
            if not (share >= goal):
                missed.append(f"{name}: {group} {share:.2f} of the oracle's gain < {goal}")
    return missed


def choose_default(summaries: dict[str, dict], reference: str = "sft", needs_topk: frozenset[str] = frozenset()) -> dict:
    """The default by the lab's rule, from each condition's `summarize` output.

    Candidates: every arm but the reference, the oracle filter and those in `needs_topk` (a
    default must run on any traces with per-token teacher log-probs; such arms are still shown).
    Qualify: ran in every condition and is not `worse` than the reference on the known or the new
    group in any of them. Choose: the qualifying arm with the largest gain, the mean over conditions
    of its paired gains on the known and the new group, if that gain is positive; otherwise the
    reference. The goal (`GOAL_NEW`/`GOAL_KNOWN` of the oracle's gains outside `GUARD_CONDITIONS`) is
    reported, not required. Returns the choice, the per-arm table and a sentence saying why.
    """
    arms = [a for s in summaries.values() for a in s if a not in NOT_CANDIDATES]
    arms = list(dict.fromkeys(arms))
    table = {}
    for arm in arms:
        ran = [s[arm]["groups"] for s in summaries.values() if arm in s]
        gains = [(g["known"]["diff_mean"] + g["new"]["diff_mean"]) / 2 for g in ran]
        gains = [x for x in gains if math.isfinite(x)]
        table[arm] = {
            "qualifies": len(ran) == len(summaries)
            and all(g[grp]["verdict"] != "worse" for g in ran for grp in ("known", "new")),
            "gain": statistics.fmean(gains) if gains else math.nan,
            "missed": _goal_missed(summaries, arm),
        }
    for arm in needs_topk & table.keys():
        table[arm]["eligible"] = False
    ranked = sorted((a for a in arms if table[a]["qualifies"] and table[a].get("eligible", True) and table[a]["gain"] > 0),
                    key=lambda a: -table[a]["gain"])
    if ranked:
        best = ranked[0]
        why = (f"It is not worse than SFT on the known or the new lengths in any of the {len(summaries)} conditions "
               f"and gains {100 * table[best]['gain']:+.1f} points over SFT (mean over conditions of its known and "
               "new gains), the most of those that qualify. ")
        missed = table[best]["missed"]
        why += ("It reaches the goal (" if not missed else "It misses the goal (") + (
            f"at least {GOAL_NEW} of the oracle's new-length gain and {GOAL_KNOWN} of its known-length gain in "
            f"every condition but {', '.join(GUARD_CONDITIONS)})" + (": " + "; ".join(missed) + "." if missed else "."))
    else:
        best = reference
        qualified = [a for a in arms if table[a]["qualifies"] and table[a].get("eligible", True)]
        why = ("No method qualifies: each is worse than SFT on the known or the new lengths in some condition"
               if not qualified else
               f"{', '.join(qualified)} never lose(s) to SFT but none is ahead of it overall")
        why += ": SFT-safe settings stay the default."
    return {"choice": best, "table": table, "why": why}
