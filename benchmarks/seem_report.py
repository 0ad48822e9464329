"""The SEEM / LayerNorm study (Yue et al. 2023) from run folders: benchmarks/results/seem.md and plots.

    python benchmarks/seem_report.py \\
        --onset runs/seem/onset --divergence runs/seem/divergence_noln runs/seem/divergence_ln \\
        --discount runs/seem/discount runs/seem/divergence_noln --sgd runs/seem/sgd \\
        --scarce runs/seem/scarce_* --cost benchmarks/results/seem_cost.md \\
        --out benchmarks/results/seem.md --plots benchmarks/results/seem

Each option takes run folders or folders holding them (a sweep's --out); the runs are those of
`algorithms/td3_bc.py` (and iql.py, cql.py for --scarce) with `--seem-every`. What is measured:

  Q bound      max|r| / (1 - γ): no policy's discounted return exceeds it in absolute value, so a
               critic above it is wrong whatever the data (r from the run's dataset).
  blow-up step the first logged step at which the chunk's mean of max|Q| over the batch exceeds
               the bound (per seed; "-" if never).
  SEEM > 0     the first logged step at which λ_max / ‖A‖_F exceeds 1e-3 (`common.SeemMonitor`'s
               threshold: stable critics sit within a few 1e-6 of 0, benchmarks/results/seem_cost.md).
  growth order the least-squares slope of ln y against ln t over the second half of the run, for
               y = max|Q| and y = ‖θ‖ (the critic's parameter norm): y ~ t^slope.
  crash step   where a run stopped on NaN/inf (diverged.json, written by common.Run.check).
  SGD rate     SEEM's prediction of the early growth per update of the TD error under SGD:
               u ← (I + (2ηP/N)·A) u (one update of the mean-squared TD loss on a batch drawn from
               the data, target = online, P parameters, N probe points), so the fastest mode grows
               by ln(1 + 2ηP·λ_max/N) per update; against it, the measured growth of ln max|Q|
               per update between consecutive logs. λ_max is for Φ scaled by 1/√P with P Q1's own
               parameter count (runs that logged no seem_num_params had used both twins': rescaled).
  scarce       each seed's mean over its final `--last-evals` evaluations (normalised score);
               mean ± std (ddof 0) over seeds, and the difference of the means (with − without LN).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # common.py, for the datasets
from report import find_runs, git_commit, last_score, load_run, mean_std, training_command  # noqa: E402

THRESHOLD = 1e-3  # normalised SEEM above which common.SeemMonitor calls a critic self-exciting
REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Measurements on one run
# --------------------------------------------------------------------------------------------

def series(run: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps (T,), values (T, S)) of a logged per-seed quantity, rows that have it only."""
    rows = [r for r in run["offline"] if name in r]
    return (np.array([r["step"] for r in rows]),
            np.array([np.asarray(r[name], np.float64).reshape(-1) for r in rows]).reshape(len(rows), -1))


def first_step_above(steps: np.ndarray, values: np.ndarray, level: float) -> list[int | None]:
    """Per seed (column), the first step whose value exceeds `level`, None if none does."""
    out = []
    for col in values.T:
        above = np.flatnonzero(col > level)
        out.append(int(steps[above[0]]) if above.size else None)
    return out


def growth_order(steps: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per seed, the slope of ln|y| against ln t over the second half of the steps."""
    keep = steps >= steps[-1] / 2
    x = np.log(steps[keep])
    return np.array([np.polyfit(x, np.log(np.abs(col[keep])), 1)[0] for col in values.T])


@functools.cache
def dataset_facts(dataset_id: str) -> tuple[float, int]:
    """(max |r|, observation + action dimension) of a dataset, loaded once."""
    import common  # JAX only where a dataset is needed
    d = common.load_dataset(dataset_id)
    return float(np.abs(d.rewards).max()), d.observations.shape[1] + d.actions.shape[1]


def q_bound(dataset_id: str, gamma: float) -> float:
    """max|r| / (1 − γ) for the dataset's rewards."""
    return dataset_facts(dataset_id)[0] / (1.0 - gamma)


def sgd_step_factor(lr: float, num_params: int, num_probe: int) -> float:
    """c in u ← (I + c·A) u: one SGD step of lr on mean (Q(X) − r − γ·sg Q(X*))² over the N probe
    points moves the TD errors u by −(2·lr/N)(K(X,X) − γK(X*,X))u with K = P·ΦΦᵀ (Φ scaled by 1/√P,
    as in A), i.e. by (2·lr·P/N)·A·u (exact for a critic linear in θ; tests/test_seem_report.py)."""
    return 2.0 * lr * num_params / num_probe


def num_params(run: dict, obs_act_dim: int) -> int:
    """Q1's parameter count: Dense layers (and LayerNorm scale and offset) of the MLP on (s, a)."""
    widths = [obs_act_dim, *run["args"]["hidden"], 1]
    p = sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))
    return p + (2 * sum(run["args"]["hidden"]) if run["args"].get("critic_layernorm") else 0)


def machine() -> str:
    import common
    return common.machine()


def crash(run: dict) -> dict | None:
    path = run["path"] / "diverged.json"
    return json.loads(path.read_text()) if path.exists() else None


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    if isinstance(x, (int, np.integer)):
        return f"{x:,}"
    return f"{x:.{digits}g}"


def seeds_str(values) -> str:
    return " / ".join(fmt(v) for v in values)


def short(dataset_id: str) -> str:
    return dataset_id.removeprefix("offlax/").removesuffix("-v0")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------

def cost_section(path: Path) -> list[str]:
    """The cost study's table, with its own command, commit and machine (benchmarks/seem_cost.py)."""
    lines = path.read_text().splitlines()
    head = [x for x in lines if x.startswith(("Command:", "Commit:", "Machine:"))]
    table = [x for x in lines if x.startswith("|")]
    return ["## 1. Cost: matrix-free against dense SEEM", "",
            f"From `{path.relative_to(REPO_ROOT) if path.is_absolute() else path}` (read it for the method and "
            "the discussion):", "", *head, "", *table, ""]


def divergence_rows(runs: list[dict]) -> tuple[list[str], list[dict]]:
    out, measured = [], []
    for run in sorted(runs, key=lambda r: (r["dataset"], bool(r["args"].get("critic_layernorm")))):
        gamma = run["args"]["gamma"]
        bound = q_bound(run["dataset"], gamma)
        steps, qmax = series(run, "q_abs_max")
        _, norm = series(run, "critic_param_norm")
        s_steps, seem_n = series(run, "seem_normalized")
        blow = first_step_above(steps, qmax, bound)
        positive = first_step_above(s_steps, seem_n, THRESHOLD)
        last = last_score([run["values"](r) for r in run["offline"]], 5)
        m = dict(run=run, bound=bound, blow=blow, positive=positive, q_end=qmax[-1], norm_end=norm[-1],
                 seem_end=seem_n[-1], seem_max=seem_n.max(0), q_order=growth_order(steps, qmax),
                 norm_order=growth_order(steps, norm), score=last, crash=crash(run))
        measured.append(m)
        out.append(f"| {short(run['dataset'])} | {'yes' if run['args'].get('critic_layernorm') else 'no'} | "
                   f"{gamma} | {fmt(bound)} | {seeds_str(positive)} | {seeds_str(blow)} | {seeds_str(qmax[-1])} | "
                   f"{seeds_str(m['q_order'])} | {seeds_str(m['norm_order'])} | {seeds_str(m['seem_max'])} | "
                   f"{seeds_str(seem_n[-1])} | {fmt(float(last.mean()), 2)} | {steps[-1]:,} |")
    return out, measured


DIV_HEADER = ["| dataset | LayerNorm | γ | Q bound | SEEM > 0 at step | max\\|Q\\| > bound at step | max\\|Q\\| at end | "
              "Q growth order | ‖θ‖ growth order | max SEEM | SEEM at end | score (last 5) | steps |",
              "|---|---|---:|---:|---|---|---|---|---|---|---|---:|---:|"]


def plot_runs(groups: list[tuple[str, list[dict], str]], path: Path, title: str) -> None:
    """`groups`: (panel, runs, colour, label); one row of panels per panel name, columns max|Q|,
    ‖θ‖ and normalised SEEM, one line per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({g[0] for g in groups}, key=lambda x: [g[0] for g in groups].index(x))
    fig, axes = plt.subplots(len(panels), 3, figsize=(15, 3.9 * len(panels)), squeeze=False)
    for row, panel in enumerate(panels):
        for _, runs, colour, label in [g for g in groups if g[0] == panel]:
            for k, run in enumerate(runs):
                for col, name in enumerate(("q_abs_max", "critic_param_norm", "seem_normalized")):
                    steps, v = series(run, name)
                    if not len(steps):
                        continue
                    ax = axes[row, col]
                    for j in range(v.shape[1]):
                        ax.plot(steps, v[:, j], color=colour, alpha=0.8, lw=1.2,
                                label=label if (k == 0 and j == 0) else None, marker="." if len(steps) < 30 else None)
                    if col == 0:
                        ax.axhline(q_bound(run["dataset"], run["args"]["gamma"]), color=colour, ls=":", lw=1)
        for col, (name, log) in enumerate((("max|Q| in the batch (dotted: max|r|/(1-γ))", True),
                                           ("critic parameter norm ‖θ‖", True),
                                           ("normalised SEEM λ_max/‖A‖_F", False))):
            ax = axes[row, col]
            ax.set_title(f"{panel}\n{name}", fontsize=9)
            ax.set_xlabel("update")
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[row, 0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def discount_section(runs: list[dict], plot: Path) -> tuple[list[str], list[dict]]:
    runs = [r for r in runs if not r["args"].get("critic_layernorm") and r["args"]["optimizer"] == "adam"
            and r["args"]["bc_alpha"] == 0 and r["dataset"] == "offlax/walker2d/medium-expert-v0"]
    rows, measured = divergence_rows(sorted(runs, key=lambda r: r["args"]["gamma"]))
    measured.sort(key=lambda m: m["run"]["args"]["gamma"])
    rows.sort(key=lambda x: float(x.split("|")[3]))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    cmap = plt.get_cmap("viridis")
    for i, m in enumerate(measured):
        run, colour = m["run"], cmap(i / max(1, len(measured) - 1))
        for col, name in enumerate(("q_abs_max", "seem_normalized")):
            steps, v = series(run, name)
            y = v / m["bound"] if col == 0 else v
            axes[col].plot(steps, y.mean(1), color=colour, label=f"γ = {run['args']['gamma']}", marker=".")
    gammas = [m["run"]["args"]["gamma"] for m in measured]
    axes[2].plot(gammas, [float(np.mean(m["q_end"] / m["bound"])) for m in measured], "o-")
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    axes[2].axhline(1.0, color="k", ls=":")
    axes[0].set_title("max|Q| / bound, mean over seeds", fontsize=9)
    axes[1].set_title("normalised SEEM, mean over seeds", fontsize=9)
    axes[2].set_title("max|Q| / bound at the end against γ", fontsize=9)
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(plot, dpi=90)
    plt.close(fig)
    return rows, measured


def sgd_section(runs: list[dict], plot: Path) -> list[str]:
    runs = sorted([r for r in runs if r["args"]["optimizer"] == "sgd"], key=lambda r: (r["args"]["lr"], r["seeds"]))
    out = ["| lr | seed | SEEM > 0 at step | λ_max then | predicted ln-growth per update | measured ln-growth of "
           "max\\|Q\\| per update (next interval) | max\\|Q\\| > bound at step | crash (NaN/inf) at update | "
           "last logged step | max\\|Q\\| there | ‖θ‖ there | Q growth order | ‖θ‖ growth order |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        a = run["args"]
        p = num_params(run, dataset_facts(run["dataset"])[1])
        steps, qmax = series(run, "q_abs_max")
        _, norm = series(run, "critic_param_norm")
        s_steps, seem_n = series(run, "seem_normalized")
        _, lam = series(run, "seem")
        # λ belongs to Φ scaled by 1/√P with P = Q1's parameter count. Runs before the scripts logged
        # seem_num_params passed both twin critics' parameters, so they divided by 2P: rescale those.
        logged = series(run, "seem_num_params")[1] if any("seem_num_params" in r for r in run["offline"]) else 2 * p
        lam = lam * logged / p
        bound = q_bound(run["dataset"], a["gamma"])
        blow = first_step_above(steps, qmax, bound)
        c = crash(run)
        n_probe = 2560  # common.SeemMonitor's num_probe, which every script uses
        for j, seed in enumerate(run["seeds"]):
            pos = first_step_above(s_steps, seem_n[:, j:j + 1], THRESHOLD)[0]
            pred = meas = lam_then = None
            if pos is not None:
                i = int(np.flatnonzero(s_steps == pos)[0])
                lam_then = float(lam[i, j])
                pred = float(np.log1p(sgd_step_factor(a["lr"], p, n_probe) * lam_then))
                k = int(np.flatnonzero(steps == pos)[0])
                if k + 1 < len(steps):
                    meas = float(np.log(qmax[k + 1, j] / qmax[k, j]) / (steps[k + 1] - steps[k]))
            half = len(steps) >= 4
            out.append(f"| {a['lr']} | {seed} | {fmt(pos)} | {fmt(lam_then)} | {fmt(pred)} | {fmt(meas)} | "
                       f"{fmt(blow[j])} | {fmt(c['step']) if c else 'none'} | {steps[-1]:,} | {fmt(qmax[-1, j])} | "
                       f"{fmt(norm[-1, j])} | {fmt(growth_order(steps, qmax[:, j:j + 1])[0]) if half else '-'} | "
                       f"{fmt(growth_order(steps, norm[:, j:j + 1])[0]) if half else '-'} |")
    lrs = sorted({r["args"]["lr"] for r in runs})
    colours = {lr: f"C{i}" for i, lr in enumerate(lrs)}
    plot_runs([("walker2d-me, SGD", [r for r in runs if r["args"]["lr"] == lr],
                colours[lr], f"lr {lr}") for lr in lrs], plot, "SGD: growth and crash")
    return out


def scarce_section(runs: list[dict]) -> list[str]:
    def setting(a):
        return f"{a['num_transitions']} transitions" if a.get("num_transitions") else f"{a['data_fraction']:.0%}"

    table: dict[tuple, dict] = {}
    for run in runs:
        a = run["args"]
        scores = last_score([run["values"](r) for r in run["offline"]], run["last_evals"]) if run["offline"] else None
        key = (run["algo"], short(run["dataset"]), setting(a))
        table.setdefault(key, {})[bool(a.get("critic_layernorm"))] = (run, scores)
    order = ["100%", "10%", "1%", "10 transitions", "1 transitions"]
    out = ["| algorithm | dataset | data | without LayerNorm | with LayerNorm | difference | per seed without | "
           "per seed with |", "|---|---|---|---:|---:|---:|---|---|"]
    for key in sorted(table, key=lambda k: (k[0], k[1], order.index(k[2]) if k[2] in order else 99)):
        cell = table[key]

        def show(ln):
            if ln not in cell:
                return "not run", "-", None
            run, s = cell[ln]
            c = crash(run)
            if c:
                return f"diverged at update {c['step']:,}", "-", None
            if s is None:
                return "no evaluation", "-", None
            m, sd = mean_std(s)
            return f"{m:.1f} ± {sd:.1f}" + ("" if run["finished"] else " (unfinished)"), seeds_str(s), m
        without, with_ = show(False), show(True)
        diff = f"{with_[2] - without[2]:+.1f}" if with_[2] is not None and without[2] is not None else "-"
        out.append(f"| {key[0]} | {key[1]} | {key[2].replace('1 transitions', '1 transition')} | {without[0]} | "
                   f"{with_[0]} | {diff} | {without[1]} | {with_[1]} |")
    return out


def provenance(runs: list[dict]) -> list[str]:
    def state(r):
        c = crash(r)
        return "" if r["finished"] else f" (stopped: NaN/inf at update {c['step']:,})" if c else " (unfinished)"
    return [f"- `{r['path'].parent.name}/{r['name']}`{state(r)}: `{training_command(r['config'])}` at commit "
            f"{r['config'].get('commit', '?')} on {r['config'].get('machine', '?')}" for r in runs]


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("onset", "divergence", "discount", "sgd", "scarce"):
        p.add_argument(f"--{name}", nargs="*", type=Path, default=[], help=f"run folders of the {name} study")
    p.add_argument("--cost", type=Path, help="the cost study's markdown (benchmarks/results/seem_cost.md)")
    p.add_argument("--notes", type=Path, help="a markdown file of readings, placed after the tables")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--plots", type=Path, required=True, help="path prefix of the PNGs (<prefix>_divergence.png, ...)")
    return p


def main(argv: list[str] | None = None) -> str:
    args = parser().parse_args(argv)
    load = lambda paths: [load_run(p) for p in find_runs(paths)] if paths else []  # noqa: E731
    onset, divergence, discount, sgd, scarce = (load(getattr(args, k)) for k in
                                                ("onset", "divergence", "discount", "sgd", "scarce"))
    args.plots.parent.mkdir(parents=True, exist_ok=True)
    rel = lambda p: os.path.relpath(p.resolve(), args.out.resolve().parent)  # noqa: E731  (image links from the .md)
    command = "python benchmarks/seem_report.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = ["# SEEM and LayerNorm: predicting and preventing Q divergence", "",
             f"Report: `{command}`  ", f"Commit: {git_commit()}  ",
             f"Machine: {machine()}, written {time.strftime('%Y-%m-%d')}; the runs' own commits and machines are "
             "listed at the end.", "",
             "Setting (the paper's divergence recipe): `algorithms/td3_bc.py --bc-alpha 0 --tau 1`, i.e. TD3 with the "
             "behaviour-cloning term off and the target networks copied at every actor update, Adam lr 3e-4, batch "
             "256, γ 0.99, critic 256x256 ReLU; SEEM of Q_θ1 on a probe of N = 2,560 dataset transitions drawn once, "
             "X* = (s', π(s')). How each column is measured is in the docstring of `benchmarks/seem_report.py`.", ""]
    if args.cost:
        lines += cost_section(args.cost)
    if onset or divergence:
        lines += ["## 2. Divergence: pure offline TD3 with and without LayerNorm", ""]
        per_seed = "per seed, seeds 0 / 1 / 2"
        if onset:
            rows, _ = divergence_rows(onset)
            path = Path(f"{args.plots}_onset.png")
            plot_runs([(short(r["dataset"]) + " (first updates)", [r], "tab:blue" if r["args"].get("critic_layernorm")
                        else "tab:red", "LayerNorm" if r["args"].get("critic_layernorm") else "no LayerNorm")
                       for r in onset], path, "Onset: SEEM and Q in the first updates")
            lines += [f"### The first updates (SEEM every {onset[0]['args']['seem_every']} updates; {per_seed})", "",
                      *DIV_HEADER, *rows, "", f"![onset]({rel(path)})", ""]
        if divergence:
            rows, _ = divergence_rows(divergence)
            path = Path(f"{args.plots}_divergence.png")
            plot_runs([(short(r["dataset"]), [r], "tab:blue" if r["args"].get("critic_layernorm") else "tab:red",
                        "LayerNorm" if r["args"].get("critic_layernorm") else "no LayerNorm") for r in divergence],
                      path, "Pure offline TD3 (bc-alpha 0, tau 1): with and without LayerNorm")
            lines += [f"### Over training ({per_seed})", "", *DIV_HEADER, *rows, "", f"![divergence]({rel(path)})", ""]
    if discount:
        path = Path(f"{args.plots}_discount.png")
        rows, measured = discount_section(discount, path)
        lines += ["## 3. Discount sweep (no LayerNorm, walker2d medium-expert)", "", *DIV_HEADER, *rows, "",
                  f"![discount]({rel(path)})", ""]
    if sgd:
        path = Path(f"{args.plots}_sgd.png")
        lines += ["## 4. SGD: growth, crash, and SEEM's early prediction", "", *sgd_section(sgd, path), "",
                  f"![sgd]({rel(path)})", ""]
    if scarce:
        lines += ["## 5. Data-scarce: with against without LayerNorm", "", *scarce_section(scarce), ""]
    if args.notes:
        lines += [args.notes.read_text().rstrip(), ""]
    everything = onset + divergence + [r for r in discount if r not in divergence] + sgd + scarce
    seen, unique = set(), []
    for r in everything:
        if r["path"] not in seen:
            seen.add(r["path"])
            unique.append(r)
    lines += ["## Runs", "", *provenance(unique), ""]
    text = "\n".join(lines)
    args.out.write_text(text)
    print(f"wrote {args.out} and {args.plots}_*.png")
    return text


if __name__ == "__main__":
    main()
