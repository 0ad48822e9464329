"""offlax.common: the plumbing every algorithm script shares, and nothing else.

Sections, in the order a script uses them:
  1. Data: load any Minari dataset (local, remote, or the project's own `offlax/` suite built on
     first use), validate it, flatten it to float32 transitions, cache the flat arrays.
  2. Preprocessing: observation statistics, data subsets, device arrays, action boxes.
  3. Buffers: on-device uniform sampling, an online replay buffer as a pytree, a mixed sampler.
  4. Evaluation: deterministic policies on a vectorised environment, all seeds at once.
  5. SEEM: the self-excitation eigenvalue of Yue et al. (2023), matrix-free.
  6. Runs: run folder, metrics log, progress bar, checkpoints, exact resume, divergence guard,
     and the offline and online training loops.

The algorithms (networks, losses, updates) never live here: each script holds its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import flax
import gymnasium as gym
import jax
import jax.flatten_util  # noqa: F401  (ravel_pytree, for dense SEEM)
import jax.numpy as jnp
import numpy as np

# --------------------------------------------------------------------------------------------
# 1. Data
# --------------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent
FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals", "episode_ends")
TRANSITION_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals")  # what TD needs
CACHE_NAME = "offlax_flat.npz"
CACHE_VERSION = 1  # part of the cache's fingerprint: raise it when flatten_episodes changes

# The offlax suite: D4RL's recipe on Gymnasium v5, with D4RL's reference scores (random, expert).
OFFLAX_ENVS = {
    "hopper": ("Hopper-v5", -20.272305, 3234.3),
    "halfcheetah": ("HalfCheetah-v5", -280.178953, 12135.0),
    "walker2d": ("Walker2d-v5", 1.629008, 4592.3),
}
OFFLAX_QUALITIES = ("random", "medium", "medium-replay", "expert", "medium-expert")
BUILD_COMMAND = "python benchmarks/make_datasets.py offlax/hopper/random-v0  (or: --all)"


class DataError(ValueError):
    """A dataset is missing, unreadable or inconsistent. The message says what and what to do."""


@dataclasses.dataclass
class Dataset:
    """Flat float32 transitions of a Minari dataset, plus what evaluation needs.

    `terminals` is the TD done mask (the environment ended the episode); `episode_ends` marks the
    last transition of every episode, terminal or time limit. A truncated episode keeps its real
    next observation, so bootstrapping through a time limit stays correct.
    """

    id: str
    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: np.ndarray
    terminals: np.ndarray
    episode_ends: np.ndarray
    env_spec: Any  # gymnasium EnvSpec of the evaluation environment, None if the dataset has none
    action_low: np.ndarray
    action_high: np.ndarray
    ref_min_score: float | None = None
    ref_max_score: float | None = None

    def __len__(self) -> int:
        return len(self.rewards)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in FIELDS}

    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of every episode (split at `episode_ends`; a trailing cut counts)."""
        ends = np.flatnonzero(self.episode_ends)
        if len(ends) == 0 or ends[-1] != len(self) - 1:
            ends = np.append(ends, len(self) - 1)
        return np.add.reduceat(self.rewards.astype(np.float64), np.r_[0, ends[:-1] + 1])

    def normalized_score(self, returns) -> np.ndarray:
        """D4RL's score: 100 * (R - random) / (expert - random); NaN without reference scores."""
        return normalized_score(returns, self.ref_min_score, self.ref_max_score)

    def make_env(self) -> gym.Env:
        if self.env_spec is None:
            raise DataError(f"dataset {self.id} stores no environment spec: it cannot be evaluated")
        try:
            env = gym.make(self.env_spec)
        except Exception as e:  # e.g. a namespace whose package is missing (gymnasium-robotics)
            hint = ("install the package that registers it (AntMaze and Adroit: pip install gymnasium-robotics)"
                    if isinstance(e, (ImportError, gym.error.Error)) else
                    "the package that provides it fails with the installed versions (gymnasium-robotics "
                    "1.4.2's FrankaKitchen does with mujoco 4)")
            raise DataError(f"the environment of dataset {self.id} cannot be made ({type(e).__name__}: {e}); "
                            f"{hint}") from e
        if isinstance(env.observation_space, gym.spaces.Dict):
            env = gym.wrappers.FlattenObservation(env)
        return env


def normalized_score(returns, ref_min: float | None, ref_max: float | None) -> np.ndarray:
    returns = np.asarray(returns, np.float64)
    if ref_min is None or ref_max is None:
        return np.full_like(returns, np.nan)
    return 100.0 * (returns - ref_min) / (ref_max - ref_min)


def env_reference_scores(env_id: str) -> tuple[float | None, float | None]:
    """D4RL's (random, expert) returns for the suite's environments, else (None, None)."""
    return next(((lo, hi) for eid, lo, hi in OFFLAX_ENVS.values() if eid == env_id), (None, None))


def datasets_root() -> Path:
    """Minari's root: $MINARI_DATASETS_PATH, else ~/.minari/datasets."""
    return Path(os.environ.get("MINARI_DATASETS_PATH") or Path.home() / ".minari" / "datasets")


def local_dataset_ids() -> list[str]:
    root = datasets_root()
    return sorted(str(p.parent.parent.relative_to(root)) for p in root.glob("**/data/metadata.json"))


def load_dataset(dataset_id: str) -> Dataset:
    """Loads a Minari dataset as flat float32 transitions, validated.

    Order: the local copy; else, for an `offlax/` id, build it from the committed behaviour
    policies; else download it if the network is reachable, and fail within seconds if not.
    """
    data_dir = datasets_root() / dataset_id / "data"
    if not (data_dir / "metadata.json").exists():
        if dataset_id.startswith("offlax/"):
            try:  # the recipes live with their policies, in benchmarks/
                from benchmarks.offlax_suite import build_offlax_dataset
            except ImportError as e:
                raise DataError(f"{dataset_id} is not built and building it needs benchmarks/offlax_suite.py "
                                "and benchmarks/policies/ of the offlax repository beside common.py") from e
            build_offlax_dataset(dataset_id)
        else:
            _download(dataset_id)
    import minari

    try:
        mds = minari.load_dataset(dataset_id)
        arrays = _cached_flat_arrays(mds, data_dir)
    except DataError:
        raise
    except Exception as e:  # h5py, json and Minari errors all mean the files are damaged
        raise DataError(
            f"dataset {dataset_id} at {data_dir} could not be read ({type(e).__name__}: {e}). "
            f"Delete that folder and build or download it again."
        ) from e
    meta = mds.storage.metadata
    dataset = Dataset(
        id=dataset_id,
        **arrays,
        env_spec=getattr(mds, "_eval_env_spec", None) or mds.spec.env_spec,
        action_low=np.asarray(mds.spec.action_space.low, np.float32),
        action_high=np.asarray(mds.spec.action_space.high, np.float32),
        ref_min_score=meta.get("ref_min_score"),
        ref_max_score=meta.get("ref_max_score"),
    )
    # Check against the environment itself where there is one: a dataset's declared spaces can lie.
    obs_space, act_space = mds.spec.observation_space, mds.spec.action_space
    if dataset.env_spec is not None:
        env = dataset.make_env()
        obs_space, act_space = env.observation_space, env.action_space
        env.close()
    obs_shape = obs_space.shape if obs_space.shape is not None else (gym.spaces.flatdim(obs_space),)
    validate_transitions(arrays, obs_shape, act_space.low, act_space.high, dataset_id)
    # train in the box the policy will act in (the environment's), not the one the dataset declares
    dataset.action_low = np.asarray(act_space.low, np.float32)
    dataset.action_high = np.asarray(act_space.high, np.float32)
    return dataset


def _download(dataset_id: str) -> None:
    """Downloads a remote dataset, or fails fast with the local ids and the build command."""
    from huggingface_hub import constants

    local = ", ".join(local_dataset_ids()) or "none"
    offline_msg = (
        f"dataset '{dataset_id}' is not stored locally (in {datasets_root()}) and {{why}}. "
        f"Local datasets: {local}. The project's own datasets (offlax/<hopper|halfcheetah|walker2d>/"
        f"<{'|'.join(OFFLAX_QUALITIES)}>-v0) build on first use or with: {BUILD_COMMAND}"
    )
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise DataError(offline_msg.format(why="HF_HUB_OFFLINE is set, so it cannot be downloaded"))
    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    try:  # one quick connection instead of Minari's ~23 s of retries
        socket.create_connection((host, url.port or 443), timeout=3).close()
    except OSError as e:
        raise DataError(offline_msg.format(why=f"the dataset server {host} is unreachable ({e})")) from e
    import minari

    try:
        minari.download_dataset(dataset_id)
    except Exception as e:
        raise DataError(f"could not download dataset '{dataset_id}': {e}. Check the id "
                        f"(minari list remote) and the network.") from e


def flatten_episodes(mds) -> dict[str, np.ndarray]:
    """Concatenates a MinariDataset's episodes into flat float32 transition arrays."""
    obs_space = mds.spec.observation_space
    cols = {k: [] for k in FIELDS}
    for ep in mds.iterate_episodes():
        obs = ep.observations
        if isinstance(obs, dict):  # same key order as gymnasium.spaces.flatten
            obs = np.concatenate([np.asarray(obs[k]).reshape(len(ep.rewards) + 1, -1)
                                  for k in obs_space.spaces], axis=1)
        term, trunc = np.asarray(ep.terminations, bool), np.asarray(ep.truncations, bool)
        ends = term | trunc
        ends[-1] = True  # the episode's last stored step ends it, whatever the flags say
        cols["observations"].append(obs[:-1])
        cols["next_observations"].append(obs[1:])
        cols["actions"].append(np.asarray(ep.actions).reshape(len(ep.rewards), -1))
        cols["rewards"].append(ep.rewards)
        cols["terminals"].append(term)
        cols["episode_ends"].append(ends)
    if not cols["rewards"]:
        raise DataError(f"dataset {mds.spec.dataset_id} has no episodes")
    return {k: np.concatenate(v).astype(np.float32) for k, v in cols.items()}


def _cached_flat_arrays(mds, data_dir: Path) -> dict[str, np.ndarray]:
    """Flat arrays from the cache beside the dataset, rebuilt when the dataset files change."""
    sources = sorted(p for p in data_dir.iterdir() if p.name != CACHE_NAME and not p.name.endswith(".tmp"))
    fingerprint = json.dumps([CACHE_VERSION, [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sources]])
    cache = data_dir / CACHE_NAME
    if cache.exists():
        try:
            with np.load(cache) as f:
                if str(f["fingerprint"]) == fingerprint:
                    return {k: f[k] for k in FIELDS}
        except Exception:  # a damaged cache is rebuilt below, never trusted
            pass
    arrays = flatten_episodes(mds)
    try:
        _atomic_savez(cache, fingerprint=np.array(fingerprint), **arrays)
    except OSError as e:  # a read-only or full disk costs only the speed-up, never the dataset
        print(f"warning: could not write the dataset cache {cache} ({e}); continuing without it", file=sys.stderr)
    return arrays


def validate_transitions(arrays, obs_shape, action_low, action_high, name="dataset", tol=1e-5):
    """Raises DataError naming the field and the first bad index of any inconsistency."""
    n = len(arrays["observations"])
    for k in FIELDS:
        if len(arrays[k]) != n:
            raise DataError(f"{name}: field '{k}' has {len(arrays[k])} rows but 'observations' has {n}")
    for k in ("rewards", "terminals", "episode_ends"):  # (n, 1) would broadcast TD targets to (B, B)
        if np.ndim(arrays[k]) != 1:
            raise DataError(f"{name}: field '{k}' has shape {np.shape(arrays[k])}; it must hold one value per "
                            f"transition, shape ({n},)")
    low, high = np.asarray(action_low, np.float64), np.asarray(action_high, np.float64)
    if not (np.isfinite(low).all() and np.isfinite(high).all() and (low < high).all()):
        raise DataError(f"{name}: the action space [{low}, {high}] is not a finite box with low < high; the "
                        f"algorithms here act in a bounded box")
    if tuple(arrays["actions"].shape[1:]) != low.shape:
        raise DataError(f"{name}: field 'actions' has shape {arrays['actions'].shape[1:]} per step but the "
                        f"action space has shape {low.shape}")
    for k in FIELDS:
        finite = np.isfinite(arrays[k]).reshape(n, -1).all(axis=1)
        if not finite.all():
            i = int(np.argmin(finite))
            raise DataError(f"{name}: field '{k}' holds a non-finite value (NaN or inf) at index {i}: "
                            f"{arrays[k][i]}. Rebuild the dataset or drop that episode.")
    for k in ("observations", "next_observations"):
        if tuple(arrays[k].shape[1:]) != tuple(obs_shape):
            raise DataError(f"{name}: field '{k}' has shape {arrays[k].shape[1:]} per step but the "
                            f"environment's observations have shape {tuple(obs_shape)}")
    a = arrays["actions"]
    outside = ((a < np.asarray(action_low) - tol) | (a > np.asarray(action_high) + tol)).reshape(n, -1).any(axis=1)
    if outside.any():
        i = int(np.argmax(outside))
        raise DataError(f"{name}: field 'actions' at index {i} is {a[i]}, outside the action space "
                        f"[{action_low}, {action_high}]. Clip the actions when recording the data.")


def _atomic_savez(path: Path, **arrays) -> None:
    """np.savez to a temporary file, then rename: readers never see a half-written file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: concurrent writers never collide
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# 2. Preprocessing
# --------------------------------------------------------------------------------------------

def obs_stats(dataset: Dataset, eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the dataset's observations (std + eps, as TD3+BC)."""
    return dataset.observations.mean(0), dataset.observations.std(0) + eps


def subsample(dataset: Dataset, fraction: float = 1.0, num_transitions: int | None = None,
              seed: int = 0) -> tuple[Dataset, np.ndarray]:
    """A random subset of the transitions, drawn once without replacement (the data-scarce study);
    returns it and the kept indices (to subsample per-transition arrays such as MC returns alike).

    The subset depends only on `seed` (callers pass a fixed one), so every training seed of a
    vmapped run sees the same data, as separate runs would."""
    n = len(dataset)
    if num_transitions is None and fraction == 1.0:
        return dataset, np.arange(n)
    k = num_transitions if num_transitions is not None else int(round(fraction * n))
    if not 1 <= k <= n:
        raise DataError(f"asked for {k} transitions (--data-fraction {fraction}, --num-transitions "
                        f"{num_transitions}) but {dataset.id} has {n}; ask for between 1 and {n}")
    idx = np.sort(np.random.default_rng(seed).choice(n, k, replace=False))
    return dataclasses.replace(dataset, **{f: getattr(dataset, f)[idx] for f in FIELDS}), idx


def device_arrays(dataset: Dataset, obs_mean=None, obs_std=None, reward_scale=1.0, reward_bias=0.0,
                  extra: dict | None = None) -> dict[str, jax.Array]:
    """The dataset as device arrays, ready to sample inside jit.

    Observations are normalised if statistics are given, rewards become scale * r + bias, actions
    are mapped to [-1, 1] (every policy here acts in that box), `terminals` is the TD done mask.
    """
    d = dataset.arrays()
    mean = 0.0 if obs_mean is None else obs_mean
    std = 1.0 if obs_std is None else obs_std
    out = {
        "observations": (d["observations"] - mean) / std,
        "next_observations": (d["next_observations"] - mean) / std,
        "actions": to_unit_box(d["actions"], dataset.action_low, dataset.action_high),
        "rewards": d["rewards"] * reward_scale + reward_bias,
        "terminals": d["terminals"],
    }
    out.update(extra or {})
    return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}


def to_unit_box(a, low, high):
    return np.clip(2.0 * (a - low) / (high - low) - 1.0, -1.0, 1.0)


def from_unit_box(a, low, high):
    return low + (np.asarray(a) + 1.0) * 0.5 * (high - low)


# --------------------------------------------------------------------------------------------
# 3. Buffers (pure functions and pytrees: they run inside jit and lax.scan)
# --------------------------------------------------------------------------------------------

def sample_batch(key, data: dict, batch_size: int) -> dict:
    """A batch drawn uniformly with replacement from on-device arrays."""
    n = jax.tree.leaves(data)[0].shape[0]
    idx = jax.random.randint(key, (batch_size,), 0, n)
    return jax.tree.map(lambda x: x[idx], data)


@flax.struct.dataclass
class ReplayBuffer:
    """A fixed-capacity ring buffer of transitions on the device; `size` and `pos` are arrays."""

    data: dict
    size: jax.Array
    pos: jax.Array

    @classmethod
    def create(cls, example: dict, capacity: int, initial: dict | None = None) -> "ReplayBuffer":
        """An empty buffer shaped like one `example` transition, optionally seeded with `initial`."""
        data = {k: jnp.zeros((capacity,) + jnp.shape(v), jnp.float32) for k, v in example.items()}
        buf = cls(data=data, size=jnp.zeros((), jnp.int32), pos=jnp.zeros((), jnp.int32))
        if initial is not None:
            n = len(jax.tree.leaves(initial)[0])
            if n > capacity:
                raise ValueError(f"buffer capacity {capacity} is smaller than the {n} initial transitions")
            buf = cls(data={k: data[k].at[:n].set(initial[k]) for k in data},
                      size=jnp.asarray(n, jnp.int32), pos=jnp.asarray(n % capacity, jnp.int32))
        return buf

    @property
    def capacity(self) -> int:
        return jax.tree.leaves(self.data)[0].shape[0]

    def add(self, transitions: dict, count=None) -> "ReplayBuffer":
        """Adds a batch of transitions (leading axis), overwriting the oldest when full. With
        `count` (may be traced), only the first `count` rows are added: a variable-length
        trajectory held in a fixed-size array (`count` must not exceed the capacity: it is traced, so
        unchecked here; CQL and Cal-QL make their buffers at least one trajectory long)."""
        k = jax.tree.leaves(transitions)[0].shape[0]
        if count is None and k > self.capacity:  # the same slot would be written twice, no defined winner
            raise ValueError(f"adding {k} transitions at once to a buffer of capacity {self.capacity}")
        n = k if count is None else count
        idx = jnp.where(jnp.arange(k) < n, (self.pos + jnp.arange(k)) % self.capacity, self.capacity)
        data = {name: self.data[name].at[idx].set(transitions[name], mode="drop") for name in self.data}
        return ReplayBuffer(data=data, size=jnp.minimum(self.size + n, self.capacity),
                            pos=(self.pos + n) % self.capacity)

    def sample(self, key, batch_size: int) -> dict:
        idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(self.size, 1))
        return jax.tree.map(lambda x: x[idx], self.data)


def sample_mixed(key, offline: dict, buffer: ReplayBuffer, batch_size: int, offline_fraction: float) -> dict:
    """A batch with exactly round(batch_size * offline_fraction) offline rows, the rest online."""
    n_off = int(round(batch_size * offline_fraction))
    k_off, k_on = jax.random.split(key)
    parts = []
    if n_off > 0:
        parts.append(sample_batch(k_off, {k: offline[k] for k in buffer.data}, n_off))
    if n_off < batch_size:
        parts.append(buffer.sample(k_on, batch_size - n_off))
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


# --------------------------------------------------------------------------------------------
# 4. Evaluation
# --------------------------------------------------------------------------------------------

def vector_env(make_env: Callable[[], gym.Env], n: int) -> gym.vector.SyncVectorEnv:
    """n environments stepped in one process (faster than async on 2 cores), SAME_STEP resets."""
    return gym.vector.SyncVectorEnv([make_env] * n, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


# Model fields that environments change at reset (Adroit's pen orientation, door and nail positions,
# the maze target site): not part of MuJoCo's integration state, so saved beside it.
_RESET_MODEL_FIELDS = ("body_pos", "body_quat", "site_pos")


def _mujoco_derived(data) -> dict:
    """MjData's fixed-size arrays: positions, forces and the like that mj_step derives from the
    state it starts from and leaves behind, one step stale (Ant's and Humanoid's rewards read
    them before stepping); the constraint arrays (efc_, efm_) change size and are recomputed."""
    out = {}
    for k in dir(data):
        if not k.startswith(("_", "efc_", "efm_")):
            v = getattr(data, k)
            if isinstance(v, np.ndarray):
                out[k] = v.copy()
    return out


def _env_parts(u) -> list:
    """The env itself and any sub-env it wraps (AntMaze's `ant_env`), each with its own RNG."""
    return [u] + [v for k, v in sorted(vars(u).items()) if isinstance(v, gym.Env)]


def get_env_states(envs: gym.vector.SyncVectorEnv) -> np.ndarray:
    """Everything that decides the future of each sub-environment, pickled into a byte array for a
    checkpoint: MuJoCo's integration state (incl. warm starts), the model fields set at reset, the
    env's array and number attributes (goals, Adroit's target length), every reset RNG and the
    time-limit counter."""
    import pickle

    import mujoco

    states = []
    for env in envs.envs:
        u = env.unwrapped
        s = {"rng": [p.np_random.bit_generator.state for p in _env_parts(u)],
             "elapsed": _time_limit(env)._elapsed_steps,
             "attrs": {k: np.copy(v) if isinstance(v, np.ndarray) else v for k, v in vars(u).items()
                       if isinstance(v, (np.ndarray, np.generic, int, float))}}
        if hasattr(u, "model") and hasattr(u, "data"):
            spec = mujoco.mjtState.mjSTATE_INTEGRATION
            s["mujoco"] = np.empty(mujoco.mj_stateSize(u.model, spec))
            mujoco.mj_getState(u.model, u.data, s["mujoco"], spec)
            s["model"] = {f: getattr(u.model, f).copy() for f in _RESET_MODEL_FIELDS}
            s["derived"] = _mujoco_derived(u.data)
        elif hasattr(u, "state"):  # classic control keeps its state in `state`
            s["state"] = np.array(u.state, copy=True)
        else:
            raise DataError(f"the state of environment {env.spec.id if env.spec else u} cannot be saved (it is "
                            f"neither MuJoCo nor classic control), so online runs on it could not resume exactly")
        states.append(s)
    return np.frombuffer(pickle.dumps(states), np.uint8)


def set_env_states(envs: gym.vector.SyncVectorEnv, blob: np.ndarray) -> None:
    import pickle

    import mujoco

    envs.reset()  # the wrappers insist on a reset before any step; everything it set is overwritten
    for env, s in zip(envs.envs, pickle.loads(np.asarray(blob, np.uint8).tobytes())):
        u = env.unwrapped
        rngs = [s["rng"]] if isinstance(s["rng"], dict) else s["rng"]  # checkpoints before the list
        for part, rng in zip(_env_parts(u), rngs):
            part.np_random.bit_generator.state = rng
        _time_limit(env)._elapsed_steps = s["elapsed"]
        for k, v in s.get("attrs", {}).items():
            now = getattr(u, k, None)
            if isinstance(now, np.ndarray) and now.shape == np.shape(v):
                now[...] = v  # in place: the attribute may be a view into MuJoCo's memory
            else:
                setattr(u, k, np.copy(v) if isinstance(v, np.ndarray) else v)
        if "mujoco" in s:
            for f, v in s.get("model", {}).items():
                getattr(u.model, f)[:] = v
            mujoco.mj_setState(u.model, u.data, s["mujoco"], mujoco.mjtState.mjSTATE_INTEGRATION)
            for k, v in s.get("derived", {}).items():
                now = getattr(u.data, k)
                if now.shape == v.shape:  # arrays sized by the step's contacts/islands are recomputed anyway
                    now[...] = v
        else:
            u.state = s["state"]


def snapshot_mismatch(make_env: Callable[[], gym.Env], steps: int = 20) -> str | None:
    """Checks that get/set_env_states capture this environment: a snapshot restored into another
    instance must continue bit for bit under the same actions. None if it does, else what differs
    (state the env keeps elsewhere, e.g. in a list or a stateful wrapper)."""
    a, b = vector_env(make_env, 1), vector_env(make_env, 1)
    rng = np.random.default_rng(0)
    space = a.action_space
    actions = [rng.uniform(space.low, space.high).astype(space.dtype) for _ in range(steps + 5)]
    a.reset(seed=1)
    b.reset(seed=2)
    for act in actions[:5]:
        a.step(act)
    set_env_states(b, get_env_states(a))
    try:
        for t, act in enumerate(actions[5:]):
            for name, x, y in zip(("observation", "reward", "termination", "truncation"), a.step(act), b.step(act)):
                if not np.array_equal(x, y):
                    return f"the {name} differs at step {t + 1} after a restore"
        return None
    finally:
        a.close()
        b.close()


def _time_limit(env):
    while not isinstance(env, gym.wrappers.TimeLimit):
        env = env.env
    return env


def episode_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] % (2 ** 31))


class Evaluator:
    """Runs `episodes` deterministic episodes for every seed at once, in one vectorised env.

    `policy(params, obs) -> action in [-1, 1]` acts for one seed; it is vmapped over the seed axis
    of `params`. Episode resets depend on (seed, evaluation step, episode), never on the seed's
    position in the batch, so a vmapped run evaluates exactly like single-seed runs.
    """

    def __init__(self, make_env: Callable[[], gym.Env], seeds: list[int], episodes: int, policy: Callable):
        self.seeds, self.episodes = list(seeds), episodes
        self.envs = vector_env(make_env, len(self.seeds) * episodes)
        space = self.envs.single_action_space
        self.low, self.high = space.low, space.high
        self.act = jax.jit(jax.vmap(policy))

    def __call__(self, params, step: int) -> np.ndarray:
        """Raw undiscounted returns, shape (num_seeds, episodes)."""
        S, E = len(self.seeds), self.episodes
        reset_seeds = [episode_seed(s, step, j) for s in self.seeds for j in range(E)]
        obs, _ = self.envs.reset(seed=reset_seeds)
        returns, done = np.zeros(S * E), np.zeros(S * E, bool)
        while not done.all():
            a = np.asarray(self.act(params, jnp.asarray(obs, jnp.float32).reshape(S, E, -1)))
            obs, r, term, trunc, _ = self.envs.step(from_unit_box(a.reshape(S * E, -1), self.low, self.high))
            returns += np.where(done, 0.0, r)
            done |= term | trunc
        return returns.reshape(S, E)


# --------------------------------------------------------------------------------------------
# 5. SEEM: does TD training self-excite? (Yue et al. 2023)
# --------------------------------------------------------------------------------------------
# With Φ(X) the per-sample gradients ∇_θ Q(s_i, a_i) / √P of the critic on a probe X and X* =
# {(s'_i, π(s'_i))}, one gradient step on the TD error u moves it as u ← (I + η A) u with
#     A = γ Φ(X*) Φ(X)ᵀ − Φ(X) Φ(X)ᵀ     (N × N),
# so training self-excites (diverges) when A has an eigenvalue with positive real part. SEEM is
# that largest real part, also reported divided by ‖A‖_F. Matrix-free: Φ(X)ᵀ v is a VJP of Q(X)
# and Φ(·) w a JVP, so A·v never forms Φ (N × P) and costs three passes over the probe.

def seem_matvec(q_fn: Callable, gamma: float, transpose: bool = False) -> Callable:
    """A jitted v -> A·v (or Aᵀ·v) for `q_fn(params, obs, actions) -> (N,)` (one critic's values).

    With A = (γΦ(X*) − Φ(X)) Φ(X)ᵀ: A·v = γ·jvp(Q(X*), vjp(Q(X), v)) − jvp(Q(X), vjp(Q(X), v)) and
    Aᵀ·v = jvp(Q(X), γ·vjp(Q(X*), v) − vjp(Q(X), v)); the 1/√P scalings make 1/P overall."""

    @jax.jit
    def matvec(params, probe, vs):  # vs: (N, k) -> A·vs: (N, k)
        obs, act, next_obs, next_act = probe
        num_params = sum(x.size for x in jax.tree.leaves(params))
        q_x = lambda p: q_fn(p, obs, act)  # noqa: E731
        q_next = lambda p: q_fn(p, next_obs, next_act)  # noqa: E731
        _, vjp = jax.vjp(q_x, params)
        _, vjp_next = jax.vjp(q_next, params) if transpose else (None, None)

        def one(v):
            if transpose:
                w = jax.tree.map(lambda a, b: gamma * a - b, vjp_next(v)[0], vjp(v)[0])
                return jax.jvp(q_x, (params,), (w,))[1] / num_params
            (w,) = vjp(v)  # Φ(X)ᵀ v √P
            _, jx = jax.jvp(q_x, (params,), (w,))
            _, jxs = jax.jvp(q_next, (params,), (w,))
            return (gamma * jxs - jx) / num_params

        return jax.vmap(one, in_axes=1, out_axes=1)(vs)

    return matvec


def frobenius_norm(apply: Callable, apply_t: Callable, n: int, samples: int, seed: int = 0) -> float:
    """‖A‖_F from `samples` products with A or Aᵀ by Hutch++ (Meyer et al. 2021) on tr(AᵀA): the
    part of ‖A‖_F² in the dominant subspace Q = orth(AᵀA S) exactly, the rest by Hutchinson on
    vectors projected off Q. Plain Hutchinson's variance is large when a few directions dominate
    A (a self-exciting critic); tests/test_seem.py shows it off by more than 5% where Hutch++ is within 1%."""
    rng = np.random.default_rng(seed)
    k = max(samples // 4, 1)
    q, _ = np.linalg.qr(apply_t(apply(rng.standard_normal((n, k)))))
    g = rng.standard_normal((n, max(samples - 3 * k, 1)))
    g -= q @ (q.T @ g)
    return float(np.sqrt(np.sum(apply(q) ** 2) + np.sum(apply(g) ** 2) / g.shape[1]))


def seem(q_fn: Callable, params, probe: tuple, gamma: float, fro_samples: int = 32, seed: int = 0,
         tol: float = 1e-6, ncv: int = 40, restarts: int = 10) -> tuple[float, float, bool]:
    """(λ_max, λ_max / ‖A‖_F, converged): the largest real part of A's eigenvalues by implicitly
    restarted Arnoldi (ARPACK, which="LR") on the matrix-free operator, at most `restarts`
    restarts of `ncv` vectors; where the rightmost eigenvalues are too clustered for that budget
    (typical of stable critics, whose λ_max lies within ~1e-5·‖A‖_F of 0), the largest real Ritz
    value of the Arnoldi factorisation instead (converged = False). ‖A‖_F by `frobenius_norm`
    from `fro_samples` products."""
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigs

    n = probe[0].shape[0]

    def blocks(fn):  # (n, m) numpy -> (n, m) float64, 8 columns at a time (bounded memory)
        def apply(v):
            v = np.asarray(v, np.float64).reshape(n, -1)
            return np.concatenate([np.asarray(fn(params, probe, jnp.asarray(v[:, i:i + 8], jnp.float32)), np.float64)
                                   for i in range(0, v.shape[1], 8)], axis=1)
        return apply

    apply = blocks(seem_matvec(q_fn, gamma))
    op = LinearOperator((n, n), dtype=np.float64, matvec=lambda v: apply(v)[:, 0], matmat=apply)
    converged = True
    try:
        v0 = np.random.default_rng(seed).standard_normal(n)  # ARPACK's own start is unseeded: fix it
        lam = eigs(op, k=1, which="LR", tol=tol, ncv=min(ncv, n - 1), maxiter=restarts, v0=v0,
                   return_eigenvectors=False)
    except ArpackNoConvergence:
        lam, converged = arnoldi_ritz_values(op.matvec, n, min(ncv, n), seed), False
    fro = frobenius_norm(apply, blocks(seem_matvec(q_fn, gamma, transpose=True)), n, fro_samples, seed)
    lam = float(np.real(lam).max())
    return lam, lam / fro, converged


def arnoldi_ritz_values(matvec: Callable, n: int, m: int, seed: int = 0) -> np.ndarray:
    """Eigenvalues of the m x m Hessenberg matrix of an m-step Arnoldi factorisation (Ritz values)."""
    q = np.zeros((n, m + 1))
    h = np.zeros((m + 1, m))
    v = np.random.default_rng(seed).normal(size=n)
    q[:, 0] = v / np.linalg.norm(v)
    for j in range(m):
        w = matvec(q[:, j])
        for _ in range(2):  # Gram-Schmidt twice, for orthogonality in floating point
            c = q[:, :j + 1].T @ w
            w -= q[:, :j + 1] @ c
            h[:j + 1, j] += c
        h[j + 1, j] = np.linalg.norm(w)
        if h[j + 1, j] < 1e-12:
            return np.linalg.eigvals(h[:j + 1, :j + 1])
        q[:, j + 1] = w / h[j + 1, j]
    return np.linalg.eigvals(h[:m, :m])


def seem_dense(q_fn: Callable, params, probe: tuple, gamma: float) -> tuple[float, float, np.ndarray]:
    """The same from explicit per-sample gradients and a dense eigendecomposition (small networks,
    tests, benchmarks): returns (λ_max, λ_max / ‖A‖_F, A)."""
    obs, act, next_obs, next_act = probe
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    grad = jax.vmap(jax.grad(lambda f, s, a: q_fn(unravel(f), s[None], a[None])[0]), in_axes=(None, 0, 0))
    phi, phi_next = grad(flat, obs, act) / np.sqrt(flat.size), grad(flat, next_obs, next_act) / np.sqrt(flat.size)
    a = np.asarray(gamma * phi_next @ phi.T - phi @ phi.T, np.float64)
    lam = float(np.real(np.linalg.eigvals(a)).max())
    return lam, lam / float(np.linalg.norm(a)), a


class SeemMonitor:
    """SEEM every `every` steps on a probe of N dataset transitions drawn once, for every seed;
    warns when it stays positive (two measurements in a row) that Q divergence is predicted.

    "Positive" means λ/‖A‖_F > `threshold` (1e-3): a stable critic's rightmost eigenvalues sit
    within a few 1e-6·‖A‖_F of 0, where their sign is numerical noise (benchmarks/results/
    seem_cost.md), while self-exciting critics reach 0.1 to 0.8."""

    def __init__(self, every: int, data: dict | None, q_fn: Callable, gamma: float, num_probe: int = 2560,
                 seed: int = 0, threshold: float = 1e-3, restarts: int = 3):
        self.every, self.q_fn, self.gamma, self.num_probe, self.seed = every, q_fn, gamma, num_probe, seed
        # A self-exciting critic's eigenvalue stands apart and ARPACK converges in a few restarts;
        # a stable one's never converges (clustered at 0), so more restarts only cost time there.
        self.threshold, self.restarts = threshold, restarts
        self.probe = None
        if data is not None:
            self.draw(data)
        self.positive: dict[int, int] = {}

    def draw(self, data: dict) -> None:
        """Fixes the probe: `num_probe` transitions of `data`, drawn once."""
        n = data["observations"].shape[0]
        idx = np.random.default_rng(self.seed).choice(n, min(self.num_probe, n), replace=False)
        self.obs, self.act, self.next_obs = (np.asarray(data[k])[idx] for k in
                                             ("observations", "actions", "next_observations"))
        self.probe = True

    def __call__(self, step: int, critic_params, next_actions: Callable, data: Callable | None = None) -> dict:
        """Per-seed SEEM of the seed-stacked `critic_params`, the parameters of the one critic measured
        (Q_θ1 alone: P, in Φ's 1/√P, counts every parameter given, and is logged as seem_num_params);
        `next_actions(i, next_obs)` is seed i's π(s'). Online, `data()` gives the transitions to draw
        the probe from at the first measurement."""
        if not self.every or step % self.every:
            return {}
        if self.probe is None:
            self.draw(data())
        num_params = sum(x[0].size for x in jax.tree.leaves(critic_params))
        out = {"seem": [], "seem_normalized": [], "seem_converged": [], "seem_num_params": []}
        for i in range(jax.tree.leaves(critic_params)[0].shape[0]):
            probe = (self.obs, self.act, self.next_obs, np.asarray(next_actions(i, self.next_obs)))
            lam, lam_n, converged = seem(self.q_fn, tree_index(critic_params, i), probe, self.gamma,
                                         restarts=self.restarts)
            out["seem"].append(lam)
            out["seem_normalized"].append(lam_n)
            out["seem_converged"].append(float(converged))
            out["seem_num_params"].append(num_params)
            self.positive[i] = self.positive.get(i, 0) + 1 if lam_n > self.threshold else 0
            if self.positive[i] == 2:
                print(f"\nwarning: SEEM has stayed positive ({lam_n:.3f} normalised) for seed index {i}: Q divergence "
                      f"predicted at step {step}. Consider --critic-layernorm or a smaller discount.",
                      file=sys.stderr, flush=True)
        return {k: np.asarray(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# 6. Runs: folder, log, progress, checkpoints, resume, divergence guard
# --------------------------------------------------------------------------------------------

class DivergenceError(RuntimeError):
    """A loss or Q-value became NaN or inf. The message names the step and the quantity."""


def check_run_args(args, *positive: str) -> None:
    """The checks every script's Args share: counts of at least 1 (the shared ones and the script's
    `positive` extras), and every step count a multiple of --eval-every, since a run logs, measures
    SEEM, snapshots and saves only at its evaluations. Exits with a message naming the flag."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    for name in ("num_seeds", "total_steps", "eval_every", "eval_episodes", "batch_size", "last_evals",
                 "checkpoint_every", *positive):
        if hasattr(args, name) and getattr(args, name) < 1:
            raise SystemExit(f"{flag(name)} must be at least 1, got {getattr(args, name)}")
    for name in ("total_steps", "online_steps", "checkpoint_every", "seem_every", "snapshot_every"):
        value = getattr(args, name, 0)
        if value < 0 or value % args.eval_every:
            raise SystemExit(f"{flag(name)} ({value}) must be a non-negative multiple of --eval-every "
                             f"({args.eval_every})")


def resume_args(args):
    """With --resume DIR, the run's saved config (the same dataclass type) replaces the CLI args."""
    if not getattr(args, "resume", None):
        return args
    path = Path(args.resume) / "config.json"
    if not path.exists():
        raise SystemExit(f"--resume {args.resume}: no config.json there; pass a run folder "
                         f"made by this script (runs/<algo>__<dataset>__<time>/)")
    if not (Path(args.resume) / "checkpoint.npz").exists():  # resuming would restart it in place, over its log
        raise SystemExit(f"--resume {args.resume}: no checkpoint.npz there (the run stopped before its first "
                         f"checkpoint), so there is nothing to resume; start the run again without --resume")
    saved = json.loads(path.read_text())["args"]
    fields = {f.name for f in dataclasses.fields(args)}
    # JSON has no tuples: give tuple-valued fields (network widths) their type back
    saved = {k: tuple(v) if isinstance(v, list) and isinstance(getattr(args, k), tuple) else v
             for k, v in saved.items() if k in fields and k != "resume"}
    return dataclasses.replace(args, **saved)


def seed_keys(seed: int, num_seeds: int) -> jax.Array:
    """One PRNG key per seed: seed i of a vmapped run is the single run with seed `seed + i`."""
    return jnp.stack([jax.random.PRNGKey(seed + i) for i in range(num_seeds)])


class Run:
    """One training run: `runs/<algo>__<dataset>__<time>/` with config.json, metrics.jsonl,
    checkpoint.npz and summary.json; a progress bar; optional wandb."""

    def __init__(self, algo: str, args, total_steps: int, ref_scores: tuple = (None, None)):
        self.args, self.total = args, total_steps
        self.ref_scores = ref_scores  # (random, expert) returns; (None, None) logs raw returns only
        self.seeds = [args.seed + i for i in range(args.num_seeds)]
        if getattr(args, "resume", None):
            self.dir = Path(args.resume)
        else:
            name = f"{algo}__{(getattr(args, 'dataset', None) or getattr(args, 'env_id', 'env')).replace('/', '-')}"
            self.dir = Path(args.runs_dir) / f"{name}__{time.strftime('%Y%m%d-%H%M%S')}__s{args.seed}"
            self.dir.mkdir(parents=True, exist_ok=False)
            (self.dir / "config.json").write_text(json.dumps(
                {"algo": algo, "args": dataclasses.asdict(args), "command": " ".join(sys.argv),
                 "commit": git_commit(), "machine": machine()}, indent=2))
        self.ckpt = self.dir / "checkpoint.npz"
        self.history: list[dict] = []
        self.bar = None
        self.wandb = None
        if getattr(args, "wandb", False):
            try:
                import wandb
            except ImportError as e:
                raise SystemExit("--wandb needs the wandb package: pip install wandb") from e
            self.wandb = wandb.init(project="offlax", name=self.dir.name, config=dataclasses.asdict(args))

    # -- checkpoints --
    def restore(self, state, branch_from: str | Path | None = None):
        """(state, step): the checkpoint if resuming (truncating the log to it), else (state, 0).
        With `branch_from` (another run's folder; ignored when resuming), a fresh run starts from that
        run's checkpoint and copies its log up to it: one pre-training, several continuations.
        Host-side extras saved with the checkpoint are left in `self.extra`."""
        metrics = self.dir / "metrics.jsonl"
        self.extra = {}
        source = self.dir if getattr(self.args, "resume", None) else Path(branch_from) if branch_from else None
        if source is None or not (source / "checkpoint.npz").exists():
            if metrics.exists():
                metrics.unlink()
            return state, 0
        state, step, self.extra = load_checkpoint(source / "checkpoint.npz", state)
        if (source / "metrics.jsonl").exists():
            rows = [json.loads(line) for line in (source / "metrics.jsonl").read_text().splitlines() if line.strip()]
            self.history = [r for r in rows if r["step"] <= step]
            metrics.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        return state, step

    def checkpoint_step(self) -> int:
        """The step of the checkpoint a resumed run continues from (0 for a fresh run)."""
        if not getattr(self.args, "resume", None) or not self.ckpt.exists():
            return 0
        with np.load(self.ckpt) as f:
            return int(f["step"])

    def save(self, state, step: int, extra: dict | None = None) -> None:
        save_checkpoint(self.ckpt, state, step, extra)

    # -- logging --
    def check(self, step: int, metrics: dict) -> None:
        """Raises DivergenceError naming the quantity, seed and update of the first NaN or inf.

        `metrics` maps a name to per-update values (num_seeds, K) of the chunk ending at `step`,
        or to per-seed values (num_seeds,)."""
        for name, v in metrics.items():
            v = np.asarray(v, np.float64)
            if not np.isfinite(v).all():
                seed_i, *rest = np.argwhere(~np.isfinite(v))[0]
                k = v.shape[1] if v.ndim > 1 else 1
                bad_step = step - k + 1 + (rest[0] if rest else k - 1)
                # recorded beside the metrics, so that sweeps and reports see where the run stopped
                (self.dir / "diverged.json").write_text(json.dumps(
                    {"step": int(bad_step), "quantity": name, "seed": int(self.seeds[seed_i])}))
                raise DivergenceError(
                    f"{name} became {v[(seed_i, *rest)]} at update {bad_step} (seed {self.seeds[seed_i]}). "
                    f"The last good checkpoint is kept: {self.ckpt}. Lower the learning rate, add "
                    f"--critic-layernorm where the script has it, or check the data's reward scale.")

    def log(self, step: int, metrics: dict, returns: np.ndarray | None = None, **extra) -> dict:
        """Checks every quantity is finite, then appends one row (per-seed values) to metrics.jsonl."""
        self.check(step, metrics)
        row: dict[str, Any] = {"step": int(step)}
        # Where a step runs a varying number of updates (Cal-QL's per-trajectory updates), the
        # metric "num_updates" weights the per-step means.
        weights = np.asarray(metrics["num_updates"], np.float64) if "num_updates" in metrics else None
        for name, v in metrics.items():
            v = np.asarray(v, np.float64)
            if v.ndim > 1 and weights is not None and name != "num_updates":
                row[name] = (np.sum(v * weights, -1) / np.maximum(weights.sum(-1), 1)).tolist()
            elif v.ndim > 1:
                row[name] = (v.sum(-1) if name == "num_updates" else v.mean(-1)).tolist()
            else:
                row[name] = v.tolist()
        if returns is not None:
            row["returns"] = np.asarray(returns).tolist()
            per_seed = np.asarray(returns).mean(axis=1)
            row["return_mean"] = float(per_seed.mean())
            if self.ref_scores[1] is not None:
                scores = normalized_score(per_seed, *self.ref_scores)
                row["score"] = scores.tolist()
                row["score_mean"], row["score_std"] = float(scores.mean()), float(scores.std())
        row.update(extra)
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.history.append(row)
        if self.wandb is not None:
            self.wandb.log({k: np.mean(v) for k, v in row.items() if isinstance(v, (int, float, list))}, step=step)
        self._progress(step, row)
        return row

    def _progress(self, step: int, row: dict) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=self.total, initial=step, unit="upd", dynamic_ncols=True,
                            mininterval=0 if sys.stderr.isatty() else 30)
        self.bar.update(step - self.bar.n)
        show = {k: row[k] for k in ("score_mean", "return_mean", "updates_per_s") if k in row}
        self.bar.set_postfix({k: f"{v:.1f}" for k, v in show.items()}, refresh=True)

    def finish(self) -> dict:
        """Writes summary.json: last score (mean of the final evaluations) and best score."""
        if self.bar is not None:
            self.bar.close()
        evals = [r for r in self.history if "returns" in r]
        key = "score" if evals and "score" in evals[-1] else "returns"
        summary: dict[str, Any] = {"run": str(self.dir), "measure": "normalized score" if key == "score" else "raw return"}
        if evals:
            per_eval = np.array([np.asarray(r[key]).reshape(len(self.seeds), -1).mean(1) for r in evals])  # (T, S)
            last = per_eval[-min(len(per_eval), getattr(self.args, "last_evals", 1)):].mean(0)
            summary.update(seeds=self.seeds, last_per_seed=last.tolist(), last_mean=float(last.mean()),
                           last_std=float(last.std()), best_per_seed=per_eval.max(0).tolist(),
                           best_mean=float(per_eval.max(0).mean()),
                           final_returns=evals[-1]["returns"])
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.wandb is not None:
            self.wandb.finish()
        return summary


def train_offline(run: Run, state, chunk: Callable, data, evaluate: Callable, *, start: int, total: int,
                  eval_every: int):
    """The offline phase: `chunk(state, data) -> (state, metrics)` runs `eval_every` fused updates
    for all seeds (compiled once, timed apart); after each chunk: divergence check, evaluation
    `evaluate(state, step)` (returns, or returns and extra per-seed values), a log row and a
    checkpoint. Steps run from `start` to `total`."""
    if start >= total:
        return state
    chunk, compile_s = compile_timed(chunk, state, data)
    for step in range(start + eval_every, total + 1, eval_every):
        t0 = time.perf_counter()
        state, metrics = chunk(state, data)
        jax.block_until_ready(state)
        train_s = time.perf_counter() - t0
        run.check(step, metrics)  # stop on NaN/inf before acting with a broken policy
        returns = evaluate(state, step)  # raw returns, or (returns, {name: per-seed values}) e.g. SEEM
        returns, extra = returns if isinstance(returns, tuple) else (returns, {})
        run.log(step, metrics, returns, phase="offline", updates_per_s=eval_every / train_s, compile_s=compile_s,
                **{k: np.asarray(v).tolist() for k, v in extra.items()})
        run.save(state, step)
    return state


def train_online(run: Run, state, envs: gym.vector.SyncVectorEnv, step_fn: Callable, first_action: Callable,
                 evaluate: Evaluator, *, start: int, total: int, eval_every: int, checkpoint_every: int,
                 env_offset: int = 0, learning_starts: int = 0, on_eval: Callable | None = None,
                 step_args: tuple = ()):
    """The online loop of SAC and of every fine-tuning phase: one environment per seed.

    Global steps run from `start` to `total`; global step t is environment step t - env_offset
    (offline updates, if any, came first). Each step: the environments step in Python with the
    current actions, then the jitted `step_fn(state, transition, next_obs, t) -> (state,
    next_actions, metrics)` stores the transition, updates the agent and picks the next actions
    (all seeds at once); `step_args` (e.g. the offline data) follow t as arguments, never as
    constants baked into the compiled code. Metrics count from `learning_starts`. Every `eval_every` steps: evaluate,
    log, `on_eval(step, state)`, and checkpoint with the environments' exact state, so that a
    resumed run equals an uninterrupted one.
    """
    low, high = envs.single_action_space.low, envs.single_action_space.high
    if "envs" in run.extra:  # resuming inside the online phase
        set_env_states(envs, run.extra["envs"])
        obs, action = run.extra["obs"], jnp.asarray(run.extra["action"])
        ep_return = run.extra["ep_return"]
    else:
        obs, _ = envs.reset(seed=[episode_seed(s, start, 0) for s in run.seeds])
        get_env_states(envs)  # an environment whose state cannot be checkpointed fails now, not at the first save
        mismatch = snapshot_mismatch(envs.env_fns[0])
        if mismatch:
            print(f"warning: online checkpoints of this environment will not resume exactly ({mismatch}): "
                  f"it keeps state that get_env_states does not save. Training is unaffected; a resumed run "
                  f"will differ from an uninterrupted one.", file=sys.stderr)
        state, action = first_action(state, jnp.asarray(obs, jnp.float32))
        ep_return = np.zeros(len(run.seeds))
    chunk_metrics, train_returns, t0, compile_s = [], [], time.perf_counter(), 0.0
    for t in range(start, total):
        next_obs, reward, term, trunc, info = envs.step(from_unit_box(np.asarray(action), low, high))
        done = term | trunc
        real_next = next_obs.copy()  # the true s' of an episode that just ended (next_obs is a reset)
        for i in np.flatnonzero(done):
            real_next[i] = info["final_obs"][i]
        transition = {"observations": obs, "actions": action, "rewards": reward, "next_observations": real_next,
                      "terminals": term, "episode_ends": done}
        # numpy float32, not jnp: the conversion is then no eager XLA op (about 1 ms a step saved), same values
        transition = jax.tree.map(lambda x: np.asarray(x, np.float32), transition)
        next_obs32 = np.asarray(next_obs, np.float32)
        if t == start:  # compile once, timed apart
            c0 = time.perf_counter()
            step_fn = step_fn.lower(state, transition, next_obs32, t, *step_args).compile()
            compile_s = time.perf_counter() - c0
        state, action, metrics = step_fn(state, transition, next_obs32, t, *step_args)
        if t >= learning_starts:
            chunk_metrics.append(metrics)
        ep_return += reward
        for i in np.flatnonzero(done):
            train_returns.append(ep_return[i])
            ep_return[i] = 0.0
        obs = next_obs
        step = t + 1
        if step % eval_every == 0 or step == total:
            jax.block_until_ready(state)
            steps_per_s = (step - max(start, step - eval_every)) / (time.perf_counter() - t0 - compile_s)
            metrics = jax.tree.map(lambda *x: np.stack(x, axis=1), *chunk_metrics) if chunk_metrics else {}
            run.check(step, metrics)
            returns = evaluate(state, step)
            returns, extra = returns if isinstance(returns, tuple) else (returns, {})
            run.log(step, metrics, returns, phase="online", env_steps=step - env_offset,
                    steps_per_s=steps_per_s, compile_s=compile_s,
                    train_return_mean=float(np.mean(train_returns)) if train_returns else None,
                    **{k: np.asarray(v).tolist() for k, v in extra.items()})
            if on_eval is not None:
                on_eval(step, state)
            if step % checkpoint_every == 0 or step == total:
                run.save(state, step, extra={"envs": get_env_states(envs), "obs": obs, "action": np.asarray(action),
                                             "ep_return": ep_return})
            chunk_metrics, train_returns, t0, compile_s = [], [], time.perf_counter(), 0.0
    return state


def git_commit() -> str:
    """The repository's HEAD commit, with '+dirty' when tracked files have uncommitted changes."""
    import subprocess

    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:  # the model name and the widest vector unit: one "AMD EPYC" name covers hosts 2.5-4x apart
        info = open("/proc/cpuinfo").read()
        cpu = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
        flags = set(next(l for l in info.splitlines() if l.startswith("flags")).split())
        cpu += next((f" ({isa})" for flag, isa in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), "")
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].platform}"


def save_checkpoint(path: Path, state, step: int, extra: dict | None = None) -> None:
    """Saves every leaf of a pytree (params, optimiser states, keys, buffers) atomically, plus
    host-side `extra` arrays (environment states, current observations)."""
    leaves, treedef = jax.tree.flatten(state)
    arrays = {f"leaf_{i:05d}": np.asarray(jax.random.key_data(x) if _is_typed_key(x) else x)
              for i, x in enumerate(leaves)}
    arrays.update({f"extra_{k}": np.asarray(v) for k, v in (extra or {}).items()})
    _atomic_savez(Path(path), step=np.asarray(step), treedef=np.asarray(str(treedef)), **arrays)


def load_checkpoint(path: Path, template):
    """Restores a pytree saved by `save_checkpoint` into the structure of `template`;
    returns (state, step, extra)."""
    leaves, treedef = jax.tree.flatten(template)
    with np.load(path) as f:
        if str(f["treedef"]) != str(treedef):
            raise ValueError(f"checkpoint {path} was saved from a different model or config; "
                             f"resume with the same arguments it was made with")
        restored = []
        for i, x in enumerate(leaves):
            v = f[f"leaf_{i:05d}"]
            restored.append(jax.random.wrap_key_data(v) if _is_typed_key(x) else jnp.asarray(v, x.dtype))
        extra = {k[len("extra_"):]: f[k] for k in f.files if k.startswith("extra_")}
        return jax.tree.unflatten(treedef, restored), int(f["step"]), extra


def _is_typed_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def compile_timed(fn, *example_args):
    """Compiles `fn` ahead of time on example arguments; returns (compiled, seconds)."""
    t0 = time.perf_counter()
    compiled = fn.lower(*example_args).compile()
    return compiled, time.perf_counter() - t0


def stack_seeds(tree, num_seeds: int):
    """The same pytree for every seed (e.g. a replay buffer seeded with the dataset): a leading seed axis."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_seeds,) + jnp.shape(x)), tree)


def tree_index(tree, i):
    """Seed i's slice of a seed-stacked pytree."""
    return jax.tree.map(lambda x: x[i], tree)


def cli(main: Callable, args_type: type) -> None:
    """Parses `args_type` with tyro and runs `main`; data and divergence errors end the process
    with their message (exit status 1) instead of a traceback."""
    import tyro

    try:
        main(tyro.cli(args_type))
    except (DataError, DivergenceError) as e:
        sys.exit(f"error: {e}")
