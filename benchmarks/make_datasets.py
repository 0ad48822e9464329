"""Builds the offlax dataset suite from the behaviour policies in benchmarks/policies/.

    python benchmarks/make_datasets.py --all                  # every dataset whose policies exist
    python benchmarks/make_datasets.py offlax/hopper/medium-v0 offlax/walker2d/expert-v0
    python benchmarks/make_datasets.py --all --report benchmarks/results/datasets.md

Datasets go to Minari's root ($MINARI_DATASETS_PATH or ~/.minari/datasets); existing ones are
kept unless --rebuild. The recipe is D4RL's (see README, "Data"); the build is deterministic.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from benchmarks import offlax_suite  # noqa: E402


def all_ids() -> list[str]:
    recipes = offlax_suite.load_policy_manifest()["datasets"]
    return [f"offlax/{env}/{q}-v0" for env in common.OFFLAX_ENVS for q in common.OFFLAX_QUALITIES
            if f"{env}/{q}" in recipes]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ids", nargs="*", help="dataset ids (offlax/<env>/<quality>-v0)")
    p.add_argument("--all", action="store_true", help="every dataset with committed behaviour policies")
    p.add_argument("--rebuild", action="store_true", help="delete and rebuild datasets that exist")
    p.add_argument("--report", help="write a markdown table of the datasets to this file")
    a = p.parse_args()
    ids = all_ids() if a.all else a.ids
    if not ids:
        p.error("name dataset ids or pass --all")
    rows = []
    for dataset_id in ids:
        path = common.datasets_root() / dataset_id
        build_s = None
        if a.rebuild and path.exists():
            shutil.rmtree(path)
        if not (path / "data" / "metadata.json").exists():
            build_s = offlax_suite.build_offlax_dataset(dataset_id)
        if build_s is None and (path / "offlax_build.json").exists():
            build_s = json.loads((path / "offlax_build.json").read_text())["seconds"]
        ds = common.load_dataset(dataset_id)
        ret = ds.episode_returns()
        rows.append((dataset_id, len(ds), len(ret), ret.mean(), ret.min(), ret.max(),
                     ds.normalized_score(ret.mean()), build_s))
        print(f"{dataset_id}: {len(ds):,} steps, {len(ret):,} episodes, return {ret.mean():.1f} "
              f"(score {ds.normalized_score(ret.mean()):.1f})", flush=True)
    if a.report:
        commit = common.git_commit()
        lines = ["# offlax datasets", "",
                 f"Command: `python benchmarks/make_datasets.py {' '.join(sys.argv[1:])}`  ",
                 f"Commit: {commit}  ",
                 f"Machine: {common.machine()} ({time.strftime('%Y-%m-%d')})", "",
                 "Normalised score uses D4RL's reference returns (0 = random, 100 = expert); mean, min and max are "
                 "over episodes (replay data holds many short early episodes, so its per-episode mean is low, as in "
                 "D4RL's). Build time is the builder's wall time on this 2-core machine, often while other jobs ran "
                 "(recorded in offlax_build.json beside each dataset).", "",
                 "| dataset | steps | episodes | mean return | min | max | normalised score | build (s) |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r[0]} | {r[1]:,} | {r[2]:,} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.1f} | "
                         f"{'' if r[7] is None else f'{r[7]:.0f}'} |")
        Path(a.report).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
