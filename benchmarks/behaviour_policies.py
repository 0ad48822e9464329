"""Chooses behaviour policies from a SAC run's snapshots and writes them into the dataset recipes.

    python -m algorithms.sac --env-id Hopper-v5 --total-steps 1000000 --snapshot-every 10000
    python benchmarks/behaviour_policies.py hopper runs/sac__Hopper-v5__<time>__s0

D4RL's recipe (README, "Data"), applied to one SAC run:
- expert: the final snapshot (or --expert-step);
- medium: the snapshot whose stochastic return is closest to --medium-return (default: D4RL's
  medium datasets' average for the environment), looked for among snapshots before the expert;
- medium-replay: the run's replay buffer up to the medium point, rebuilt from its snapshots: the
  uniform warm-up, then --replay-segments equal stretches of the buffer, each collected by the
  snapshot nearest the stretch's midpoint, so that the mix of policies matches the buffer's.

Each chosen policy is evaluated with its stochastic actions (as the data is collected) over
--episodes episodes; the mean and std, training step, seed and the run's command go into
benchmarks/policies/manifest.json with the recipes of the five offlax datasets of the environment.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from benchmarks import offlax_suite  # noqa: E402

# D4RL's medium datasets average roughly these returns (shared/reference/data.md; issue 3).
MEDIUM_RETURN = {"hopper": 1400.0, "halfcheetah": 4800.0, "walker2d": 2900.0}


def stochastic_returns(env_id: str, policy: dict, episodes: int, seed: int) -> np.ndarray:
    """Undiscounted returns of the policy's stochastic actions, `episodes` episodes at once."""
    import gymnasium as gym

    envs = common.vector_env(lambda: gym.make(env_id), episodes)
    low, high = envs.single_action_space.low, envs.single_action_space.high
    rng = np.random.default_rng(seed)
    obs, _ = envs.reset(seed=[common.episode_seed(seed, 0, j) for j in range(episodes)])
    returns, done = np.zeros(episodes), np.zeros(episodes, bool)
    while not done.all():
        obs, r, term, trunc, _ = envs.step(offlax_suite.policy_actions(policy, obs, rng, low, high))
        returns += np.where(done, 0.0, r)
        done |= term | trunc
    return returns


def load(path: Path) -> dict:
    return dict(np.load(path), kind="tanh_gaussian")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("env", choices=list(common.OFFLAX_ENVS))
    p.add_argument("run", type=Path, help="a SAC run folder with policies/step_*_seed*.npz")
    p.add_argument("--expert-step", type=int, help="snapshot step of the expert (default: the last)")
    p.add_argument("--no-expert", action="store_true",
                   help="the run has not reached its expert yet: write medium and medium-replay only")
    p.add_argument("--medium-return", type=float, help="target stochastic return of the medium policy")
    p.add_argument("--replay-segments", type=int, default=8, help="snapshots making up medium-replay")
    p.add_argument("--episodes", type=int, default=100, help="episodes per reported return")
    p.add_argument("--seed", type=int, default=12345)
    a = p.parse_args()

    env_id = common.OFFLAX_ENVS[a.env][0]
    config = json.loads((a.run / "config.json").read_text())
    snaps = {int(f.name.split("_")[1]): f for f in sorted((a.run / "policies").glob("step_*_seed*.npz"))}
    steps = sorted(snaps)
    expert_step = a.expert_step or steps[-1]
    target = a.medium_return or MEDIUM_RETURN[a.env]

    # medium: shortlist by the run's own training returns (stochastic), then measure the best few
    rows = {r["step"]: r for r in map(json.loads, (a.run / "metrics.jsonl").read_text().splitlines())}
    candidates = [s for s in steps if (s < expert_step or a.no_expert) and rows.get(s, {}).get("train_return_mean") is not None]
    candidates.sort(key=lambda s: abs(rows[s]["train_return_mean"] - target))
    measured = {s: stochastic_returns(env_id, load(snaps[s]), 20, a.seed).mean() for s in candidates[:4]}
    medium_step = min(measured, key=lambda s: abs(measured[s] - target))
    print(f"{a.env}: medium at step {medium_step} (20-episode return {measured[medium_step]:.0f}, target {target:.0f})")

    out = offlax_suite.POLICY_DIR / a.env
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.npz"):
        old.unlink()
    manifest = offlax_suite.load_policy_manifest()
    manifest["policies"] = {k: v for k, v in manifest["policies"].items() if not k.startswith(f"{a.env}/")
                            or k == f"{a.env}/random"}
    command = f"python -m algorithms.sac {' '.join(config['command'].split()[1:])}"

    def add(name, step, evaluate=True):
        shutil.copyfile(snaps[step], out / f"{name}.npz")
        entry = {"kind": "tanh_gaussian", "file": f"{a.env}/{name}.npz", "env_id": env_id, "train_steps": step,
                 "seed": config["args"]["seed"], "command": command, "commit": config.get("commit")}
        if evaluate:
            ret = stochastic_returns(env_id, load(snaps[step]), a.episodes, a.seed)
            entry.update(return_mean=float(ret.mean()), return_std=float(ret.std()), episodes=a.episodes)
            print(f"  {name}: step {step}, return {ret.mean():.0f} ± {ret.std():.0f} over {a.episodes} episodes")
        manifest["policies"][f"{a.env}/{name}"] = entry

    add("medium", medium_step)
    if not a.no_expert:
        add("expert", expert_step)
    # medium-replay: warm-up, then the snapshots in between, each for the steps until the next one
    learning_starts = config["args"]["learning_starts"]
    manifest["policies"][f"{a.env}/warmup"] = {"kind": "uniform", "env_id": env_id,
                                                "note": "SAC's uniformly random warm-up steps"}
    # The buffer's steps [learning_starts, medium_step) split into equal segments; each segment is
    # collected by the snapshot nearest its midpoint, which stands for the improving policy of that
    # stretch better than the snapshot at its start would (early policies improve fastest).
    bounds = np.linspace(learning_starts, medium_step, a.replay_segments + 1).round().astype(int)
    recipe = [[f"{a.env}/warmup", learning_starts]]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        s = min(steps, key=lambda x: abs(x - (lo + hi) / 2))
        name = f"replay_{s // 1000:04d}k"
        if f"{a.env}/{name}" not in manifest["policies"]:
            add(name, s, evaluate=False)
        recipe.append([f"{a.env}/{name}", int(hi - lo)])
    manifest["datasets"].update({f"{a.env}/medium": [[f"{a.env}/medium", 1_000_000]], f"{a.env}/medium-replay": recipe})
    if not a.no_expert:
        manifest["datasets"].update({
            f"{a.env}/expert": [[f"{a.env}/expert", 1_000_000]],
            f"{a.env}/medium-expert": [[f"{a.env}/medium", 1_000_000], [f"{a.env}/expert", 1_000_000]]})
    (offlax_suite.POLICY_DIR / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"  medium-replay: {sum(n for _, n in recipe):,} steps from {len(recipe)} segments")


if __name__ == "__main__":
    main()
