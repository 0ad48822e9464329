"""Turns run folders into a markdown results file: tables by configuration, curves, provenance.

    python benchmarks/report.py runs/iql__* runs/td3_bc__* --title "IQL and TD3+BC" \\
        --out benchmarks/results/iql.md --curves benchmarks/results/iql_curves.png \\
        --copy-runs benchmarks/results/runs --readme-section iql

Inputs are run folders (config.json and metrics.jsonl; checkpoints are not needed, so the copies
made by --copy-runs are inputs too) or folders holding them anywhere below (a sweep's --out).

Runs are grouped by configuration: algorithm, dataset and the arguments that differ between the
runs of that algorithm (e.g. critic_layernorm), seeds and bookkeeping (run folder, --resume,
--wandb, --checkpoint-every, reused pre-trained parts: smac's --score-from and --offline-from)
aside. Runs of one configuration with different seeds are pooled: their per-seed values are
concatenated. If two runs share a seed, the further one is kept and the other is named.

Offline table, per configuration, from the offline evaluations (an online-only script such as sac
gets the same table from its online evaluations, under "Online from scratch"):
  last      each seed's mean over its final `--last-evals` evaluations (the run's own setting
            unless --last-evals is given); mean ± std (ddof 0) over seeds, and the interquartile
            mean (IQM) with a 95% percentile-bootstrap interval over seeds.
  best      each seed's best evaluation; mean ± std and IQM [95% CI] over seeds.
  returns   each seed's mean raw return in the last evaluation.
  updates/s the median over evaluation chunks (environment steps/s for online-only runs);
            compile s: the median over runs of the first chunk's compile time.

The IQM is the mean of the middle 50% of the seeds' values, the boundary values weighted by the
fraction of them inside the quartiles (Agarwal et al. 2021); with a number of seeds divisible by
four it is the 25%-trimmed mean, e.g. IQM(1, 2, 3, 4) = 2.5; with three seeds x1 <= x2 <= x3 it
is (x1 + 4 x2 + x3) / 6. The interval resamples the seeds with replacement (--resamples, fixed
RNG seed) and takes the 2.5th and 97.5th percentiles of the resampled IQMs.

Online table, for runs that fine-tune online after the offline phase:
  offline   the offline 'last' score above.
  final     each seed's mean over its final `--last-evals` online evaluations.
  drop      the largest fall below the offline score in the first --drop-window environment steps:
            per seed max(0, offline - lowest online evaluation in the window), so 0 = no dip.
  regret    cumulative regret, per seed the mean over all online evaluations of 1 - score/100.
Each is mean ± std over seeds.
  min-max   the regret min-max normalised over the table's configurations on the same dataset,
            (regret - lowest) / (highest - lowest) of their means: 0 = the least regret there,
            1 = the most (the SMAC paper's "normalised regret"); '–' with fewer than two.

Scores are D4RL-normalised (0 = random, 100 = expert); runs on data without reference scores
report raw returns instead (and no regret). Every run's command, commit and machine are listed
under the tables, from the run's own config.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
# Arguments that never make two runs different configurations.
# Arguments that do not set what is learned: seeds, folders, logging, how often to checkpoint (resume is exact),
# and the folders of a reused pre-trained part (smac's score model and pre-training; the script checks that
# they were made with the run's own settings).
BOOKKEEPING = {"seed", "num_seeds", "runs_dir", "resume", "wandb", "dataset", "env_id", "checkpoint_every",
               "score_from", "offline_from"}


# --------------------------------------------------------------------------------------------
# Statistics (pure functions of per-seed values)
# --------------------------------------------------------------------------------------------

def iqm_weights(n: int) -> np.ndarray:
    """Weights of the sorted values in the interquartile mean of n values: value i covers the
    mass [i/n, (i+1)/n]; its weight is its overlap with [1/4, 3/4], over 1/2."""
    lo, hi = np.arange(n) / n, np.arange(1, n + 1) / n
    return np.clip(np.minimum(hi, 0.75) - np.maximum(lo, 0.25), 0, None) / 0.5


def iqm(values) -> float:
    """Interquartile mean: the mean of the middle 50% with fractional boundary weights."""
    x = np.sort(np.asarray(values, np.float64).ravel())
    if x.size == 0:
        return float("nan")
    return float(x @ iqm_weights(x.size))


def bootstrap_ci(values, stat=iqm, resamples: int = 2000, confidence: float = 0.95, seed: int = 0):
    """Percentile bootstrap interval of `stat` over seeds: resample the values with replacement
    `resamples` times (fixed RNG seed, so the report is reproducible) and take the percentiles."""
    x = np.asarray(values, np.float64).ravel()
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    samples = x[rng.integers(0, x.size, size=(resamples, x.size))]
    if stat is iqm:  # the same weights for every resample: one matrix product
        stats = np.sort(samples, axis=1) @ iqm_weights(x.size)
    else:
        stats = np.array([stat(s) for s in samples])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def last_score(per_eval, last_evals: int) -> np.ndarray:
    """(T, S) per-evaluation per-seed values -> (S,): each seed's mean over the final evaluations."""
    per_eval = np.asarray(per_eval, np.float64)
    return per_eval[-max(1, min(len(per_eval), last_evals)):].mean(0)


def best_score(per_eval) -> np.ndarray:
    """(T, S) -> (S,): each seed's best evaluation."""
    return np.asarray(per_eval, np.float64).max(0)


def online_drop(offline, env_steps, online, window: int) -> np.ndarray:
    """Per seed, how far the score fell below the offline score during the first `window`
    environment steps of fine-tuning: max(0, offline - min of the online evaluations at
    env_steps <= window). NaN where no evaluation lies in the window.

    offline: (S,); env_steps: (T,); online: (T, S)."""
    offline = np.asarray(offline, np.float64)
    online = np.asarray(online, np.float64)
    inside = np.asarray(env_steps) <= window
    if not inside.any():
        return np.full(offline.shape, np.nan)
    return np.maximum(0.0, offline - online[inside].min(0))


def cumulative_regret(online) -> np.ndarray:
    """(T, S) normalised scores of the online evaluations -> (S,): mean of 1 - score/100."""
    return (1.0 - np.asarray(online, np.float64) / 100.0).mean(0)


def minmax_regret(datasets: list[str], regrets: list[float]) -> list[float]:
    """Mean regrets -> each one min-max normalised among the entries of the same dataset:
    (r - min) / (max - min); NaN where a dataset has fewer than two finite values or no spread."""
    out = []
    for d, r in zip(datasets, regrets):
        same = [x for e, x in zip(datasets, regrets) if e == d and np.isfinite(x)]
        spread = max(same) - min(same) if len(same) > 1 else 0.0
        out.append((r - min(same)) / spread if spread > 0 and np.isfinite(r) else float("nan"))
    return out


def mean_std(values) -> tuple[float, float]:
    x = np.asarray(values, np.float64)
    return (float(x.mean()), float(x.std())) if x.size else (float("nan"), float("nan"))


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------

def is_run(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "metrics.jsonl").is_file()


def find_runs(paths: list[Path]) -> list[Path]:
    """Each path that is a run folder, and every run folder below each path that is not."""
    found: list[Path] = []
    for path in paths:
        if is_run(path):
            found.append(path)
        elif path.is_dir():
            below = sorted(p.parent for p in path.rglob("config.json") if is_run(p.parent))
            if not below:
                raise SystemExit(f"error: {path} is not a run folder and holds none (no config.json "
                                 f"with metrics.jsonl)")
            found += below
        else:
            raise SystemExit(f"error: {path} does not exist")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return [Path(p) for p in unique]


def row_phase(row: dict) -> str:
    """A metrics row's phase; rows of older runs have none: online rows carry steps_per_s."""
    return row.get("phase") or ("online" if "steps_per_s" in row else "offline")


def load_run(path: Path) -> dict:
    """A run folder's config, evaluation rows and summary, with its per-seed score matrices."""
    config = json.loads((path / "config.json").read_text())
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "returns" in r]
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").exists() else {}
    args = config.get("args", {})
    n = int(args.get("num_seeds", 1))
    seeds = summary.get("seeds") or [int(args.get("seed", 0)) + i for i in range(n)]
    measure = "score" if rows and all("score" in r for r in rows) else "return"

    def values(r):  # (S,) per-seed score, or mean raw return where there are no reference scores
        if measure == "score":
            return np.asarray(r["score"], np.float64).reshape(n)
        return np.asarray(r["returns"], np.float64).reshape(n, -1).mean(1)

    offline = [r for r in rows if row_phase(r) == "offline"]
    online = [r for r in rows if row_phase(r) == "online"]
    total = int(args.get("total_steps", 0))
    return {
        "path": path, "name": path.name, "config": config, "args": args, "algo": config.get("algo", "?"),
        "dataset": args.get("dataset") or args.get("env_id") or "?", "seeds": list(seeds), "rows": rows,
        "summary": summary, "finished": bool(summary), "measure": measure,
        "last_evals": int(args.get("last_evals", 1)), "total_steps": total,
        "offline": offline, "online": online,
        # the main phase: the offline evaluations, or all of them for an online-only script (sac)
        "main": offline if offline else online,
        "values": values,
        "env_steps": [r.get("env_steps", r["step"] - total) for r in online],
        "last_step": rows[-1]["step"] if rows else 0,
    }


def _hashable(v):
    return tuple(_hashable(x) for x in v) if isinstance(v, list) else v


def group_runs(runs: list[dict]) -> tuple[list[dict], list[str]]:
    """Groups runs by (algo, dataset, the arguments that differ among that algorithm's runs).

    Returns (groups, notes). Runs of a group whose seeds overlap: the finished one, else the one
    that got further, is kept; the notes name the ones left out."""
    differing: dict[str, list[str]] = {}
    for algo in dict.fromkeys(r["algo"] for r in runs):
        same = [r for r in runs if r["algo"] == algo]
        keys = dict.fromkeys(k for r in same for k in r["args"] if k not in BOOKKEEPING)
        differing[algo] = [k for k in keys if len({json.dumps(r["args"].get(k), sort_keys=True) for r in same}) > 1]
    groups: dict[tuple, dict] = {}
    for r in runs:
        setting = tuple((k, _hashable(r["args"].get(k))) for k in differing[r["algo"]])
        key = (r["algo"], r["dataset"], setting)
        groups.setdefault(key, {"algo": r["algo"], "dataset": r["dataset"], "setting": dict(setting), "runs": []})
        groups[key]["runs"].append(r)
    notes = []
    for g in groups.values():
        kept, seen = [], set()
        for r in sorted(g["runs"], key=lambda r: (r["finished"], r["last_step"], r["name"]), reverse=True):
            if seen & set(r["seeds"]):
                notes.append(f"`{r['name']}` left out: its seeds {r['seeds']} are already in "
                             f"{', '.join('`' + k['name'] + '`' for k in kept)}")
                continue
            seen |= set(r["seeds"])
            kept.append(r)
        g["runs"] = sorted(kept, key=lambda r: min(r["seeds"]))
        g["label"] = ", ".join(f"{k}={_fmt_value(v)}" for k, v in g["setting"].items())
    return list(groups.values()), notes


def _fmt_value(v) -> str:
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_fmt_value(x) for x in v) + ")"
    return str(v)


def _stack(run: dict, rows: list[dict]) -> np.ndarray:
    return np.array([run["values"](r) for r in rows]).reshape(len(rows), len(run["seeds"]))


def group_stats(group: dict, last_evals: int | None = None, drop_window: int = 50_000,
                resamples: int = 2000) -> dict:
    """Per-seed statistics of a group, pooled over its runs, and their summaries."""
    last, best, final_returns, ups, compile_s = [], [], [], [], []
    online = {"offline": [], "final": [], "drop": [], "regret": []}
    for r in group["runs"]:
        n_last = last_evals or r["last_evals"]
        if r["main"]:
            main = _stack(r, r["main"])
            last.append(last_score(main, n_last))
            best.append(best_score(main))
            final = np.asarray(r["main"][-1]["returns"], np.float64).reshape(len(r["seeds"]), -1).mean(1)
            final_returns.append(final)
            ups += [x.get("updates_per_s", x.get("steps_per_s")) for x in r["main"]]
            if r["main"][0].get("compile_s") is not None:
                compile_s.append(r["main"][0]["compile_s"])
        if r["offline"] and r["online"]:
            off = last_score(_stack(r, r["offline"]), n_last)
            on = _stack(r, r["online"])
            online["offline"].append(off)
            online["final"].append(last_score(on, n_last))
            online["drop"].append(online_drop(off, r["env_steps"], on, drop_window))
            online["regret"].append(cumulative_regret(on) if r["measure"] == "score"
                                    else np.full(len(r["seeds"]), np.nan))
    cat = lambda xs: np.concatenate(xs) if xs else np.array([])  # noqa: E731
    last, best = cat(last), cat(best)
    ups = [u for u in ups if u is not None]
    stats = {
        "seeds": int(last.size), "last": last, "best": best, "final_returns": cat(final_returns),
        "last_mean_std": mean_std(last), "best_mean_std": mean_std(best),
        "last_iqm": iqm(last), "last_ci": bootstrap_ci(last, resamples=resamples),
        "best_iqm": iqm(best), "best_ci": bootstrap_ci(best, resamples=resamples),
        "updates_per_s": float(np.median(ups)) if ups else float("nan"),
        "compile_s": float(np.median(compile_s)) if compile_s else float("nan"),
        "steps": max((r["main"][-1]["step"] for r in group["runs"] if r["main"]), default=0),
        "finished": all(r["finished"] for r in group["runs"]),
        "measure": group["runs"][0]["measure"],
        "online_only": all(not r["offline"] for r in group["runs"]),
    }
    if online["offline"]:
        on = {k: cat(v) for k, v in online.items()}
        stats["online"] = {**{k: mean_std(v) for k, v in on.items()}, "per_seed": on,
                           "seeds": int(on["offline"].size),
                           "env_steps": max(r["env_steps"][-1] for r in group["runs"] if r["online"])}
    return stats


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------

def _f(x: float, digits: int = 1) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:,.{digits}f}"


def _pm(ms: tuple[float, float]) -> str:
    return "–" if not np.isfinite(ms[0]) else f"{_f(ms[0])} ± {_f(ms[1])}"


def _iqm(value: float, ci: tuple[float, float]) -> str:
    return "–" if not np.isfinite(value) else f"{_f(value)} [{_f(ci[0])}, {_f(ci[1])}]"


def offline_table(groups: list[dict], stats: list[dict], online_only: bool = False) -> list[str]:
    """One row per configuration; a 'config' column only if some configuration has settings.
    `online_only`: the table of runs with no offline phase (sac), whose steps are environment steps."""
    with_config = any(g["label"] for g in groups)
    head = ["algo", "dataset"] + (["config"] if with_config else []) + [
        "seeds", "env steps" if online_only else "steps", "last", "last IQM [95% CI]", "best", "best IQM [95% CI]",
        "last-eval return per seed", "env steps/s" if online_only else "updates/s", "compile (s)"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if h in ("algo", "dataset", "config", "last-eval return per seed") else "---:"
                            for h in head) + "|"]
    for g, s in zip(groups, stats):
        steps = f"{s['steps']:,}" + ("" if s["finished"] else "*")
        cells = [g["algo"], g["dataset"]] + ([g["label"]] if with_config else []) + [
            str(s["seeds"]), steps, _pm(s["last_mean_std"]), _iqm(s["last_iqm"], s["last_ci"]),
            _pm(s["best_mean_std"]), _iqm(s["best_iqm"], s["best_ci"]),
            ", ".join(f"{x:.0f}" for x in s["final_returns"]), _f(s["updates_per_s"], 0), _f(s["compile_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def online_table(groups: list[dict], stats: list[dict], drop_window: int) -> list[str]:
    """One row per configuration that fine-tuned online; [] if none did."""
    pairs = [(g, s) for g, s in zip(groups, stats) if "online" in s]
    if not pairs:
        return []
    with_config = any(g["label"] for g, _ in pairs)
    head = ["algo", "dataset"] + (["config"] if with_config else []) + [
        "seeds", "online env steps", "offline", "final online", f"drop (first {drop_window:,} steps)", "regret",
        "regret, min–max"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if h in ("algo", "dataset", "config") else "---:" for h in head) + "|"]
    normalised = minmax_regret([g["dataset"] for g, _ in pairs], [s["online"]["regret"][0] for _, s in pairs])
    for (g, s), n in zip(pairs, normalised):
        o = s["online"]
        cells = [g["algo"], g["dataset"]] + ([g["label"]] if with_config else []) + [
            str(o["seeds"]), f"{o['env_steps']:,}", _pm(o["offline"]), _pm(o["final"]), _pm(o["drop"]),
            "–" if not np.isfinite(o["regret"][0]) else f"{o['regret'][0]:.3f} ± {o['regret'][1]:.3f}",
            "–" if not np.isfinite(n) else f"{n:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def training_command(config: dict) -> str:
    """The command that made a run: config.json stores sys.argv, whose first word is the script."""
    words = config.get("command", "").split()
    return f"python -m algorithms.{config.get('algo', '?')} {' '.join(words[1:])}".strip()


def provenance_lines(runs: list[dict]) -> list[str]:
    return [f"- `{r['name']}`{'' if r['finished'] else ' (unfinished)'}: `{training_command(r['config'])}` at "
            f"commit {r['config'].get('commit', '?')} on {r['config'].get('machine', '?')}" for r in runs]


def explanation(measure: set[str], drop_window: int, resamples: int, any_online: bool) -> str:
    unit = "normalised score (D4RL's scale: 0 = random, 100 = expert)" if measure == {"score"} else (
        "raw return (no reference scores)" if measure == {"return"} else "normalised score, or raw return where "
        "the data has no reference scores")
    text = (f"Values are {unit}. Per seed, 'last' is the mean of its final `--last-evals` offline evaluations "
            "and 'best' its best offline evaluation; the table gives mean ± std (ddof 0) over seeds, and the "
            "interquartile mean with a 95% percentile-bootstrap interval over seeds "
            f"({resamples:,} resamples, fixed seed). Runs of one configuration are pooled by seed. "
            "Updates per second are per seed-batch (all seeds of a process advance together), median over "
            "chunks, compile time apart. Steps marked * are of unfinished runs.")
    if any_online:
        text += (" Online: 'final' is the mean of the final `--last-evals` online evaluations, 'drop' the "
                 f"largest fall below the offline score within the first {drop_window:,} environment steps "
                 "(per seed, 0 if none), 'regret' the mean over all online evaluations of 1 − score/100, and "
                 "'regret, min–max' that mean rescaled among the table's configurations on the same dataset "
                 "(0 = the least regret, 1 = the most; the SMAC paper's normalised regret).")
    return text


def update_readme(readme: Path, name: str, body: str) -> None:
    """Replaces the text between `<!-- results:NAME -->` and `<!-- /results:NAME -->`; adds the
    markers at the end of the "## Results" section (or a new such section) if missing."""
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    text = readme.read_text() if readme.exists() else ""
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        lines = text.splitlines()
        heading = next((i for i, x in enumerate(lines) if x.strip() == "## Results"), None)
        if heading is None:
            text = text.rstrip() + ("\n\n" if text.strip() else "") + "## Results\n\n" + block + "\n"
        else:
            nxt = next((i for i in range(heading + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
            body_end = nxt
            while body_end > heading + 1 and not lines[body_end - 1].strip():
                body_end -= 1
            new = lines[:body_end] + ["", *block.splitlines()] + ([""] if nxt < len(lines) else []) + lines[nxt:]
            text = "\n".join(new) + "\n"
    readme.write_text(text)


# --------------------------------------------------------------------------------------------
# Curves and copies
# --------------------------------------------------------------------------------------------

def curve(group: dict, phase_rows: str = "rows") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, min, max) over the group's seeds at every evaluated step."""
    by_step: dict[int, list[float]] = {}
    for r in group["runs"]:
        for row in r[phase_rows]:
            by_step.setdefault(row["step"], []).extend(r["values"](row).tolist())
    steps = np.array(sorted(by_step))
    vals = [np.asarray(by_step[s]) for s in steps]
    return (steps, np.array([v.mean() for v in vals]), np.array([v.min() for v in vals]),
            np.array([v.max() for v in vals]))


def draw_curves(groups: list[dict], path: Path) -> None:
    """Score against step: one panel per dataset, one line per configuration (mean over seeds,
    min–max band), a dashed line where the online phase starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(g["dataset"] for g in groups))
    labels = list(dict.fromkeys(g["algo"] + (f" ({g['label']})" if g["label"] else "") for g in groups))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {label: palette[i % len(palette)] for i, label in enumerate(labels)}  # the same in every panel
    cols = min(3, len(datasets))
    rows = -(-len(datasets) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(datasets):]:
        ax.set_visible(False)
    for ax, dataset in zip(axes.flat, datasets):
        starts = set()
        for g in (g for g in groups if g["dataset"] == dataset):
            steps, mean, low, high = curve(g)
            if not len(steps):
                continue
            label = g["algo"] + (f" ({g['label']})" if g["label"] else "")
            ax.plot(steps, mean, label=label, lw=1.4, color=colour[label])
            ax.fill_between(steps, low, high, color=colour[label], alpha=0.2, lw=0)
            starts |= {r["total_steps"] for r in g["runs"] if r["offline"] and r["online"]}
        for s in starts:
            ax.axvline(s, color="grey", ls="--", lw=0.9)
        measure = {r["measure"] for g in groups if g["dataset"] == dataset for r in g["runs"]}
        ax.set_title(dataset, fontsize=10)
        ax.set_xlabel("step (updates, then environment steps)" if starts else "step")
        ax.set_ylabel("normalised score" if measure == {"score"} else "return")
        ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:.0f}k")
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def copy_runs(runs: list[dict], dest: Path) -> None:
    """Copies each run's small records (config.json, metrics.jsonl, summary.json; diverged.json and smac's
    score_model.json where present) to dest/<run folder name>/; checkpoints stay behind."""
    for r in runs:
        target = dest / r["name"]
        target.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "metrics.jsonl", "summary.json", "diverged.json", "score_model.json"):
            src = r["path"] / name
            if src.exists() and src.resolve() != (target / name).resolve():
                shutil.copyfile(src, target / name)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders, or folders holding them (e.g. a sweep's --out)")
    p.add_argument("--title", default="Results", help="the markdown file's title")
    p.add_argument("--notes", default="", help="a paragraph placed under the title")
    p.add_argument("--out", type=Path, help="write the markdown here (it is always printed)")
    p.add_argument("--curves", type=Path, metavar="PNG", help="draw learning curves to this image")
    p.add_argument("--copy-runs", type=Path, metavar="DIR",
                   help="copy each run's config.json, metrics.jsonl, summary.json to DIR/<run folder name>/")
    p.add_argument("--readme-section", metavar="NAME",
                   help="also write the tables into README.md between <!-- results:NAME --> markers")
    p.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md",
                   help="the README to update (default: the repository's)")
    p.add_argument("--drop-window", type=int, default=50_000, metavar="STEPS",
                   help="online environment steps in which the drop below the offline score is measured "
                        "(default 50000)")
    p.add_argument("--last-evals", type=int, metavar="N",
                   help="final evaluations averaged into 'last' (default: each run's own --last-evals)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the IQM interval (default 2000)")
    return p


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    a = parser().parse_args(argv)
    runs = [load_run(p) for p in find_runs(a.runs)]
    if a.copy_runs:
        copy_runs(runs, a.copy_runs)
        runs = [load_run(a.copy_runs / r["name"]) for r in runs]  # provenance points at the copies
    groups, notes = group_runs(runs)
    stats = [group_stats(g, a.last_evals, a.drop_window, a.resamples) for g in groups]
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    # runs with no offline phase (sac) get a table of their own: their steps are environment steps
    split = {kind: [(g, s) for g, s in zip(groups, stats) if s["online_only"] == kind] for kind in (False, True)}
    offline = offline_table(*map(list, zip(*split[False]))) if split[False] else []
    scratch = offline_table(*map(list, zip(*split[True])), online_only=True) if split[True] else []
    online = online_table(groups, stats, a.drop_window)
    shown = [("..." if prev == "--notes" else x) for prev, x in zip([None, *argv], argv)]  # the notes are below
    shown = [("--notes=..." if x.startswith("--notes=") else x) for x in shown]
    command = shlex.join(["python", "benchmarks/report.py", *shown])
    lines = [f"# {a.title}", "", f"Made by `{command}` (report at commit {git_commit()}); the runs' own "
             "commands, commits and machines are under Provenance.", ""]
    if a.notes:
        lines += [a.notes, ""]
    lines += [explanation({r["measure"] for r in runs}, a.drop_window, a.resamples, bool(online)), ""]
    if offline:
        lines += ["## Offline", "", *offline, ""]
    if scratch:
        lines += ["## Online from scratch", "", "Runs with no offline phase (SAC), from their online evaluations; "
                  "'last' and 'best' as above, over environment steps.", "", *scratch, ""]
    if online:
        lines += ["## Online fine-tuning", "", *online, ""]
    if a.curves:
        draw_curves(groups, a.curves)
        rel = os.path.relpath(a.curves.resolve(), (a.out.resolve().parent if a.out else Path.cwd()))
        lines += ["## Learning curves", "", f"![learning curves]({rel})", "",
                  "Mean over seeds, band from the lowest to the highest seed; the dashed line is where the "
                  "online phase starts.", ""]
    if notes:
        lines += ["## Left out", "", *[f"- {n}" for n in notes], ""]
    lines += ["## Provenance", "", *provenance_lines(runs)]
    text = "\n".join(lines) + "\n"
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    if a.readme_section:
        commits = sorted({r["config"].get("commit", "?") for r in runs})
        machines = sorted({r["config"].get("machine", "?") for r in runs})
        source = f" (per-run commands in `{_repo_relative(a.out)}`)" if a.out else ""
        head = (f"`{command}`{source}; runs at commit "
                f"{', '.join(commits)} on {'; '.join(machines)}.")
        body = "\n".join([head] + [line for table in (offline, scratch, online) if table for line in ("", *table)])
        update_readme(a.readme, a.readme_section, body)
    print(text)
    return text


def git_commit() -> str:
    """The repository's short commit, "+dirty" if the work tree differs from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _repo_relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    main()
