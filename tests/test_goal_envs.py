"""AntMaze end to end: dict observations flattened as the environment flattens them, the sparse
reward, IQL's AntMaze family and Cal-QL's sparse-failure MC returns, offline and online."""

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import common


def test_antmaze_dataset_flattens_like_the_environment(antmaze_tiny):
    from conftest import antmaze_episodes

    data = common.load_dataset(antmaze_tiny)
    episodes = antmaze_episodes(4, 40, seed=0)
    assert len(data) == sum(len(e.rewards) for e in episodes) == 160
    env = data.make_env()  # FlattenObservation over the stored (evaluation) env spec
    assert data.observations.shape[1] == env.observation_space.shape[0] == 2 + 2 + 105
    first, _ = env.reset(seed=0)  # the fixture's first episode started from reset(seed=0)
    np.testing.assert_array_equal(data.observations[0], first.astype(np.float32))
    flat = gym.spaces.flatten(env.unwrapped.observation_space, {k: v[1] for k, v in episodes[0].observations.items()})
    np.testing.assert_array_equal(data.next_observations[0], flat.astype(np.float32))
    assert set(np.unique(data.rewards)) <= {0.0, 1.0}


def test_iql_antmaze_family_runs_offline_and_online(antmaze_tiny, tmp_path):
    from algorithms import iql

    out = iql.main(iql.Args(dataset=antmaze_tiny, family="antmaze", total_steps=20, eval_every=10,
                            eval_episodes=1, last_evals=1, online_steps=20, batch_size=16, hidden=(32, 32),
                            runs_dir=str(tmp_path)))
    rows = [json.loads(line) for line in (Path(out["run"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert all(np.isfinite(r["return_mean"]) for r in rows)


def test_cal_ql_antmaze_sparse_failure_mc_returns(antmaze_tiny, tmp_path):
    from algorithms import cal_ql

    data = common.load_dataset(antmaze_tiny)
    # random actions in 40 steps never reach the goal: every episode is a failure, G = r_neg / (1 - γ)
    assert data.rewards.max() == 0.0
    scaled = data.rewards * 10.0 - 5.0
    g = cal_ql.mc_returns(scaled, data.episode_ends, 0.99, sparse_failure_reward=0.0 * 10.0 - 5.0)
    np.testing.assert_allclose(g, -5.0 / (1 - 0.99), rtol=1e-6)
    out = cal_ql.main(cal_ql.Args(dataset=antmaze_tiny, total_steps=10, eval_every=10, eval_episodes=1,
                                  last_evals=1, online_steps=40, batch_size=16, hidden=(32, 32),
                                  critic_hidden=(32, 32), cql_n_actions=2, reward_scale=10.0, reward_bias=-5.0,
                                  sparse_failure_reward=0.0, cql_lagrange=True, runs_dir=str(tmp_path)))
    rows = [json.loads(line) for line in (Path(out["run"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50]  # evaluations every 10 online steps too
    assert all(np.isfinite(r["return_mean"]) and 0 <= np.mean(r["bound_rate"]) <= 1 for r in rows)


def test_iql_locomotion_scaling_refuses_equal_returns(antmaze_tiny):
    from algorithms import iql

    with pytest.raises(common.DataError, match="same return"):
        iql.main(iql.Args(dataset=antmaze_tiny, total_steps=10, eval_every=10, last_evals=1))
