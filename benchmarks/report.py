"""Turns run folders into a markdown results file.

    python benchmarks/report.py runs/bc__* --title "BC" --out benchmarks/results/bc.md

Each row is one run (all its seeds): the last score (mean of the final evaluations, per seed, then
mean ± std over seeds), the best score, updates per second, compile time, and the per-seed raw
returns of the final evaluation. Every run's command, commit and machine are listed under the
table, read from the run's own config.json, so the file says what produced each number.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def load_run(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").exists() else {}
    return {"path": path, "config": config, "rows": rows, "summary": summary}


def run_row(run: dict) -> str:
    a, s, rows = run["config"]["args"], run["summary"], run["rows"]
    ups = [r["updates_per_s"] for r in rows if "updates_per_s" in r]
    compile_s = next((r["compile_s"] for r in rows if "compile_s" in r), float("nan"))
    final = np.asarray(s.get("final_returns", [[np.nan]]))
    per_seed = ", ".join(f"{x:.0f}" for x in final.mean(axis=1))
    return (f"| {run['config']['algo']} | {a.get('dataset') or a.get('env_id')} | {len(s.get('seeds', []))} | "
            f"{rows[-1]['step']:,} | {s.get('last_mean', np.nan):.1f} ± {s.get('last_std', np.nan):.1f} | "
            f"{s.get('best_mean', np.nan):.1f} | {np.median(ups):,.0f} | {compile_s:.1f} | {per_seed} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--title", default="Results")
    p.add_argument("--notes", default="", help="a paragraph placed under the title")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    runs = [load_run(r) for r in a.runs]
    measure = {r["summary"].get("measure", "?") for r in runs}
    lines = [f"# {a.title}", ""]
    if a.notes:
        lines += [a.notes, ""]
    lines += [f"Scores are {' / '.join(sorted(measure))} (D4RL's scale: 0 = random, 100 = expert). 'last' is the "
              "mean of each seed's final evaluations (`--last-evals`), then mean ± std over seeds; 'best' is "
              "each seed's best evaluation, averaged. Updates per second are per seed-batch (all seeds advance "
              "together), median over chunks, compile time apart.", "",
              "| algo | dataset | seeds | updates | last | best | updates/s | compile (s) | final return per seed |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    lines += [run_row(r) for r in runs]
    lines += ["", "## Provenance", ""]
    for r in runs:
        c = r["config"]
        lines.append(f"- `{r['path'].name}`: `python -m algorithms.{c['algo']} "
                     f"{' '.join(c['command'].split()[1:])}` at commit {c.get('commit', '?')} on "
                     f"{c.get('machine', '?')}")
    text = "\n".join(lines) + "\n"
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
