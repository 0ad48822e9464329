"""Shared fixtures: a private Minari root, small datasets made here, the offline network setting."""

import os
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network

# The hand-written controller that balances InvertedPendulum-v5: a = K·s (cart pos, angle, vels).
PENDULUM_GAINS = np.array([1.0, 10.0, 1.0, 1.0])


@pytest.fixture(scope="session", autouse=True)
def minari_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("minari")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    return root


def pendulum_episodes(num_episodes: int, noise: float, seed: int, controller: bool = True):
    """Episodes of InvertedPendulum-v5 under the stabilising controller plus Gaussian noise
    (or uniform random actions), as Minari episode buffers."""
    from minari.data_collector import EpisodeBuffer

    env = gym.make("InvertedPendulum-v5")
    rng = np.random.default_rng(seed)
    episodes = []
    for ep in range(num_episodes):
        obs, _ = env.reset(seed=seed + ep)
        o, a, r, te, tr = [obs], [], [], [], []
        while True:
            if controller:
                act = np.clip(PENDULUM_GAINS @ obs + noise * rng.standard_normal(), -3, 3)
            else:
                act = rng.uniform(-3, 3)
            act = np.array([act], np.float32)
            obs, rew, term, trunc, _ = env.step(act)
            o.append(obs); a.append(act); r.append(rew); te.append(term); tr.append(trunc)
            if term or trunc:
                break
        episodes.append(EpisodeBuffer(id=ep, observations=np.asarray(o), actions=np.asarray(a),
                                      rewards=r, terminations=te, truncations=tr))
    return episodes


def make_minari_dataset(dataset_id, episodes, env_id="InvertedPendulum-v5", env_kwargs=None, **kwargs):
    import minari

    env = gym.make(env_id, **(env_kwargs or {}))
    return minari.create_dataset_from_buffers(
        dataset_id, episodes, env=env.spec, algorithm_name="test", author="offlax",
        author_email="offlax@localhost", code_permalink="tests", data_format="hdf5",
        description="offlax test data", eval_env=env.spec, **kwargs)


@pytest.fixture(scope="session")
def pendulum_dataset(minari_root):
    """test/invertedpendulum/controller-v0: 10 episodes of the noisy stabilising controller."""
    dataset_id = "test/invertedpendulum/controller-v0"
    make_minari_dataset(dataset_id, pendulum_episodes(10, noise=0.3, seed=0))
    return dataset_id


@pytest.fixture(scope="session")
def hopper_tiny(minari_root):
    """offlax/hopper/random-v0 built at 1/500 of its size (2,000 steps) in the private root."""
    from benchmarks import offlax_suite

    offlax_suite.build_offlax_dataset("offlax/hopper/random-v0", scale=0.002, progress=False)
    return "offlax/hopper/random-v0"


def antmaze_episodes(num_episodes: int, steps: int, seed: int):
    """Random-action episodes of AntMaze_UMaze-v5 (dict observations, sparse reward), cut at `steps`."""
    from minari.data_collector import EpisodeBuffer

    env = gym.make("AntMaze_UMaze-v5", max_episode_steps=steps)
    env.action_space.seed(seed)
    episodes = []
    for ep in range(num_episodes):
        obs, _ = env.reset(seed=seed + ep)
        o, a, r, te, tr = [obs], [], [], [], []
        while True:
            act = env.action_space.sample()
            obs, rew, term, trunc, _ = env.step(act)
            o.append(obs); a.append(act); r.append(rew); te.append(term); tr.append(trunc)
            if term or trunc:
                break
        observations = {k: np.stack([x[k] for x in o]) for k in o[0]}
        episodes.append(EpisodeBuffer(id=ep, observations=observations, actions=np.asarray(a),
                                      rewards=r, terminations=te, truncations=tr))
    return episodes


@pytest.fixture(scope="session")
def antmaze_tiny(minari_root):
    """test/antmaze/umaze-random-v0: 4 random episodes of 40 steps in gymnasium-robotics' AntMaze."""
    import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)
    dataset_id = "test/antmaze/umaze-random-v0"
    make_minari_dataset(dataset_id, antmaze_episodes(4, 40, seed=0), env_id="AntMaze_UMaze-v5",
                        env_kwargs={"max_episode_steps": 40})
    return dataset_id


@pytest.fixture
def interrupt_after(monkeypatch):
    """interrupt_after(step): the next run stops (KeyboardInterrupt) right after saving its
    checkpoint at `step`, as if the machine went away; later runs save normally again."""
    import common

    save = common.Run.save

    def arm(step):
        def save_then_stop(self, state, at, extra=None):
            save(self, state, at, extra)
            if at == step:
                monkeypatch.setattr(common.Run, "save", save)
                raise KeyboardInterrupt

        monkeypatch.setattr(common.Run, "save", save_then_stop)

    return arm


def q1_param_count(in_dim: int, hidden: tuple[int, ...], layernorm: bool = False) -> int:
    """Parameters of one critic MLP on (s, a): SEEM's P, which must not count the twin Q2 too."""
    widths = [in_dim, *hidden, 1]
    return sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:])) + (2 * sum(hidden) if layernorm else 0)


def random_batch(n: int = 8, obs_dim: int = 3, act_dim: int = 2, seed: int = 0) -> dict:
    """A fabricated batch of transitions (float32), every third one terminal, for losses by hand."""
    r = np.random.default_rng(seed)
    return {"observations": r.normal(size=(n, obs_dim)).astype(np.float32),
            "actions": r.uniform(-1, 1, (n, act_dim)).astype(np.float32),
            "rewards": r.normal(size=n).astype(np.float32),
            "next_observations": r.normal(size=(n, obs_dim)).astype(np.float32),
            "terminals": (np.arange(n) % 3 == 0).astype(np.float32)}
