"""Learning curves of the SAC behaviour runs and the manifest of the stored policies.

    python benchmarks/sac_report.py runs/sac__Hopper-v5__* runs/sac__Walker2d-v5__* ... \
        --out benchmarks/results/sac.md

Copies each run's config.json, metrics.jsonl and summary.json to benchmarks/results/sac_runs/<env>/
(the curves can be redrawn from them), draws benchmarks/results/sac_curves.png and writes a
markdown file with the runs' provenance and benchmarks/policies/manifest.json as a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import offlax_suite  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=RESULTS / "sac.md")
    p.add_argument("--notes", default="")
    a = p.parse_args()
    fig, axes = plt.subplots(1, len(a.runs), figsize=(5 * len(a.runs), 3.6), squeeze=False)
    lines = ["# SAC behaviour policies", "", a.notes, "", "![learning curves](sac_curves.png)", "",
             "## Runs", "", "| env | steps | last eval return (deterministic) | command | commit | machine |",
             "|---|---:|---:|---|---|---|"]
    for ax, run in zip(axes[0], a.runs):
        config = json.loads((run / "config.json").read_text())
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        env_id = config["args"]["env_id"]
        dest = RESULTS / "sac_runs" / env_id
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "metrics.jsonl", "summary.json"):
            if (run / name).exists():
                shutil.copyfile(run / name, dest / name)
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["return_mean"] for r in rows], label="evaluation (deterministic)")
        ax.plot([r["step"] for r in rows if r.get("train_return_mean") is not None],
                [r["train_return_mean"] for r in rows if r.get("train_return_mean") is not None],
                label="training episodes (stochastic)", alpha=0.7)
        for name, info in offlax_suite.load_policy_manifest()["policies"].items():
            if info.get("env_id") == env_id and "train_steps" in info and "replay" not in name:
                ax.axvline(info["train_steps"], color="grey", ls="--", lw=0.8)
                ax.text(info["train_steps"], ax.get_ylim()[1] * 0.95, name.split("/")[1], rotation=90, va="top",
                        fontsize=8)
        ax.set_title(env_id)
        ax.set_xlabel("environment steps")
        ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:.0f}k")
        ax.set_ylabel("return")
        ax.legend(fontsize=8, loc="lower right")
        lines.append(f"| {env_id} | {steps[-1]:,} | {rows[-1]['return_mean']:.0f} | "
                     f"`python -m algorithms.sac {' '.join(config['command'].split()[1:])}` | "
                     f"{config.get('commit')} | {config.get('machine')} |")
    fig.tight_layout()
    fig.savefig(RESULTS / "sac_curves.png", dpi=110)
    lines += ["", "## Stored policies (benchmarks/policies/manifest.json)", "",
              "Returns are of the stochastic policy (as the data is collected), over the stated number of "
              "episodes, by `benchmarks/behaviour_policies.py`; replay snapshots are not evaluated.", "",
              "| policy | kind | training steps | return mean ± std | episodes |", "|---|---|---:|---:|---:|"]
    for name, info in sorted(offlax_suite.load_policy_manifest()["policies"].items()):
        ret = f"{info['return_mean']:.0f} ± {info['return_std']:.0f}" if "return_mean" in info else ""
        lines.append(f"| {name} | {info['kind']} | {info.get('train_steps', '')} | {ret} | {info.get('episodes', '')} |")
    lines += ["", "## Dataset recipes", "", "| dataset | segments (policy, steps) |", "|---|---|"]
    for name, recipe in sorted(offlax_suite.load_policy_manifest()["datasets"].items()):
        lines.append(f"| offlax/{name}-v0 | {', '.join(f'{p} × {n:,}' for p, n in recipe)} |")
    a.out.write_text("\n".join(lines) + "\n")
    print(a.out.read_text())


if __name__ == "__main__":
    main()
