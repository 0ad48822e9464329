"""The offlax dataset suite: D4RL's recipe on Gymnasium v5 MuJoCo, from committed behaviour policies.

`benchmarks/policies/manifest.json` names the stored SAC snapshots (env, training steps, seed,
100-episode return, the command that made them) and each dataset's recipe, a list of segments
[policy, steps]. `build_offlax_dataset(id)` collects every segment with the stochastic policy and
seeded resets, drops each segment's trailing partial episode and writes a Minari dataset with
D4RL's reference scores; building twice gives identical arrays. `common.load_dataset` calls it
for a missing `offlax/` id; `benchmarks/make_datasets.py` builds the suite from the shell.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import zlib
from pathlib import Path
from typing import Callable

import gymnasium as gym
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

POLICY_DIR = Path(__file__).resolve().parent / "policies"


def load_policy_manifest() -> dict:
    path = POLICY_DIR / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {"policies": {}, "datasets": {}}


def policy_actions(policy: dict, obs: np.ndarray, rng: np.random.Generator, low, high) -> np.ndarray:
    """Stochastic actions of a stored behaviour policy, in the environment's action box.

    Kinds: "uniform" (uniform over the box) and "tanh_gaussian" (SAC's actor: ReLU MLP whose last
    layer gives mean and log-std; a = tanh(mean + std * noise), rescaled to the box).
    """
    if policy["kind"] == "uniform":
        return rng.uniform(low, high, size=(len(obs), len(low))).astype(np.float32)
    h = obs.astype(np.float32)
    for i in range(int(policy["num_hidden"])):
        h = np.maximum(h @ policy[f"hidden_{i}_w"] + policy[f"hidden_{i}_b"], 0.0)
    mean = h @ policy["mean_w"] + policy["mean_b"]
    log_std = np.clip(h @ policy["log_std_w"] + policy["log_std_b"], policy["log_std_min"], policy["log_std_max"])
    u = np.tanh(mean + np.exp(log_std) * rng.standard_normal(mean.shape, dtype=np.float32))
    return np.clip(low + (u + 1.0) * 0.5 * (high - low), low, high).astype(np.float32)


def collect_episodes(env_id: str, policy: dict, num_steps: int, seed: int, num_envs: int = 10,
                     progress: Callable[[int], None] | None = None) -> list:
    """Runs `policy` until `num_steps` steps of complete episodes exist; returns them in order.

    Deterministic: environment resets and action noise come from `seed`. Episodes are kept in the
    order they finish; the episode that crosses `num_steps` is cut there and dropped (as D4RL's
    trailing partial episode), so the result holds at most `num_steps` steps.
    """
    from minari.data_collector import EpisodeBuffer

    envs = gym.vector.SyncVectorEnv([lambda: gym.make(env_id)] * num_envs,
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    low, high = envs.single_action_space.low, envs.single_action_space.high
    rng = np.random.default_rng(seed)
    obs, _ = envs.reset(seed=seed)
    live = [dict(obs=[obs[i]], act=[], rew=[], term=[], trunc=[]) for i in range(num_envs)]
    episodes, total = [], 0
    while total < num_steps:
        act = policy_actions(policy, obs, rng, low, high)
        nxt, rew, term, trunc, info = envs.step(act)
        for i in range(num_envs):
            ep = live[i]
            ep["act"].append(act[i]); ep["rew"].append(float(rew[i]))
            ep["term"].append(bool(term[i])); ep["trunc"].append(bool(trunc[i]))
            done = term[i] or trunc[i]
            ep["obs"].append(info["final_obs"][i] if done else nxt[i])
            if done:
                steps = len(ep["rew"])
                if total + steps <= num_steps:
                    episodes.append(EpisodeBuffer(
                        id=len(episodes), observations=np.asarray(ep["obs"]), actions=np.asarray(ep["act"]),
                        rewards=ep["rew"], terminations=ep["term"], truncations=ep["trunc"]))
                    if progress:
                        progress(steps)
                total += steps
                live[i] = dict(obs=[nxt[i]], act=[], rew=[], term=[], trunc=[])
        obs = nxt
    envs.close()
    return episodes


def _built_segment(env_name, manifest, name, steps, scale, env_id, policy, seed):
    """The episodes of segment [name, steps] taken from an already built dataset whose whole recipe
    is that segment (medium-expert = the medium and expert datasets), or None. The stored data
    are trusted only if re-collecting their first episode (same policy, same seed) reproduces it
    exactly, so a stale dataset from an older policy file is never reused."""
    import minari
    from minari.data_collector import EpisodeBuffer

    for quality, recipe in manifest["datasets"].items():
        dataset_id = f"offlax/{quality}-v0"
        build = common.datasets_root() / dataset_id / "offlax_build.json"
        if not quality.startswith(f"{env_name}/") or recipe != [[name, steps]] or not build.exists() \
                or json.loads(build.read_text()).get("scale") != scale:
            continue
        stored = [EpisodeBuffer(id=i, observations=ep.observations, actions=ep.actions, rewards=list(ep.rewards),
                                terminations=list(ep.terminations), truncations=list(ep.truncations))
                  for i, ep in enumerate(minari.load_dataset(dataset_id).iterate_episodes())]
        if not stored:
            return None
        check = collect_episodes(env_id, policy, len(stored[0].rewards), seed)
        if len(check) == 1 and all(np.array_equal(np.asarray(getattr(check[0], f), np.float32),
                                                  np.asarray(getattr(stored[0], f), np.float32))
                                   for f in ("observations", "actions", "rewards")):
            return stored
    return None


def build_offlax_dataset(dataset_id: str, scale: float = 1.0, progress: bool = True):
    """Builds `offlax/<env>/<quality>-v0` from its recipe in benchmarks/policies/manifest.json.

    A recipe is a list of segments [policy name, steps]; each segment is collected with a seed
    derived from the policy name and the segment's position among that policy's segments, so that
    medium-expert equals medium followed by expert (and takes their episodes from the medium and
    expert datasets when those are built, after checking them). `scale` shrinks every segment (tests).
    """
    import minari

    parts = dataset_id.split("/")
    if len(parts) != 3 or parts[0] != "offlax" or parts[1] not in common.OFFLAX_ENVS or not parts[2].endswith("-v0") \
            or parts[2][:-3] not in common.OFFLAX_QUALITIES:
        raise common.DataError(f"'{dataset_id}' is not an offlax dataset id; expected offlax/<"
                        f"{'|'.join(common.OFFLAX_ENVS)}>/<{'|'.join(common.OFFLAX_QUALITIES)}>-v0")
    env_name, quality = parts[1], parts[2][:-3]
    env_id, ref_min, ref_max = common.OFFLAX_ENVS[env_name]
    manifest = load_policy_manifest()
    recipe = manifest["datasets"].get(f"{env_name}/{quality}")
    if recipe is None:
        raise common.DataError(f"no behaviour policies are committed yet for {dataset_id} (see "
                        f"{POLICY_DIR / 'manifest.json'}; they are trained with algorithms/sac.py)")
    total = sum(int(round(steps * scale)) for _, steps in recipe)
    done, t0, last = 0, time.time(), 0.0

    def report(n):
        nonlocal done, last
        done += n
        if progress and time.time() - last > 5:
            last = time.time()
            print(f"\rbuilding {dataset_id}: {done:,}/{total:,} steps ({time.time() - t0:.0f}s)",
                  end="", file=sys.stderr, flush=True)

    episodes, seen = [], {}
    for name, steps in recipe:
        info = manifest["policies"][name]
        policy = {"kind": "uniform"} if info["kind"] == "uniform" else dict(np.load(POLICY_DIR / info["file"]))
        policy["kind"] = info["kind"]
        seed = zlib.crc32(name.encode()) + 7919 * seen.get(name, 0)
        first = seen.get(name, 0) == 0
        seen[name] = seen.get(name, 0) + 1
        n = int(round(steps * scale))
        reused = _built_segment(env_name, manifest, name, steps, scale, env_id, policy, seed) if first else None
        if reused is not None:
            report(sum(len(e.rewards) for e in reused))
        episodes += reused if reused is not None else collect_episodes(env_id, policy, n, seed, progress=report)
    if progress:
        print(f"\rbuilt {dataset_id}: {sum(len(e.rewards) for e in episodes):,} steps in "
              f"{len(episodes):,} episodes ({time.time() - t0:.0f}s)", file=sys.stderr)
    episodes = [dataclasses.replace(ep, id=i) for i, ep in enumerate(episodes)]
    env = gym.make(env_id)
    minari.create_dataset_from_buffers(
        dataset_id, episodes, env=env.spec, eval_env=env.spec, algorithm_name=f"offlax recipe: {quality}",
        code_permalink="benchmarks/make_datasets.py", author="offlax", author_email="offlax@localhost",
        description=f"{quality} data for {env_id}, D4RL's recipe; segments (policy, steps): {recipe}; "
                    f"scale {scale}", ref_min_score=ref_min, ref_max_score=ref_max, data_format="hdf5")
    seconds = time.time() - t0
    (common.datasets_root() / dataset_id / "offlax_build.json").write_text(json.dumps(
        {"seconds": round(seconds, 1), "steps": int(sum(len(e.rewards) for e in episodes)), "scale": scale,
         "built": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": common.git_commit()}))
    return seconds
