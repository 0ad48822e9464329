"""The data layer: loading, failing fast offline, validation, flattening, caching, preprocessing."""

import time

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_minari_dataset, pendulum_episodes

import common
from algorithms import cal_ql, iql
from benchmarks import offlax_suite


# ---- loading ----

def test_local_dataset_loads_offline_without_network(pendulum_dataset):
    t0 = time.time()
    ds = common.load_dataset(pendulum_dataset)
    assert time.time() - t0 < 5
    assert ds.observations.dtype == np.float32 and ds.observations.shape == (len(ds), 4)
    assert ds.actions.shape == (len(ds), 1)
    assert ds.env_spec.id == "InvertedPendulum-v5"
    assert np.array_equal(ds.action_low, [-3.0]) and np.array_equal(ds.action_high, [3.0])


def test_missing_id_offline_fails_fast_with_help(pendulum_dataset):
    t0 = time.time()
    with pytest.raises(common.DataError) as err:
        common.load_dataset("mujoco/hopper/medium-v0")
    assert time.time() - t0 < 3
    msg = str(err.value)
    assert "mujoco/hopper/medium-v0" in msg and "not stored locally" in msg
    assert pendulum_dataset in msg  # lists the local datasets
    assert "make_datasets.py" in msg  # and the command that builds the project's own


def test_missing_id_unreachable_server_fails_fast(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")  # nothing listens there
    t0 = time.time()
    with pytest.raises(common.DataError, match="unreachable"):
        common.load_dataset("mujoco/walker2d/expert-v0")
    assert time.time() - t0 < 5


def test_bad_offlax_id_is_explained():
    with pytest.raises(common.DataError, match="expected offlax/"):
        common.load_dataset("offlax/hopper/mediocre-v0")


def test_flat_arrays_match_the_episodes(pendulum_dataset):
    import minari

    ds = common.load_dataset(pendulum_dataset)
    i = 0
    for ep in minari.load_dataset(pendulum_dataset).iterate_episodes():
        T = len(ep.rewards)
        np.testing.assert_allclose(ds.observations[i:i + T], ep.observations[:-1], rtol=1e-6)
        np.testing.assert_allclose(ds.next_observations[i:i + T], ep.observations[1:], rtol=1e-6)
        np.testing.assert_allclose(ds.actions[i:i + T], ep.actions, rtol=1e-6)
        np.testing.assert_allclose(ds.rewards[i:i + T], ep.rewards, rtol=1e-6)
        np.testing.assert_array_equal(ds.terminals[i:i + T], ep.terminations)
        assert ds.episode_ends[i:i + T - 1].sum() == 0 and ds.episode_ends[i + T - 1] == 1
        i += T
    assert i == len(ds)


def test_flat_cache_is_used_and_refreshed(minari_root):
    dataset_id = "test/invertedpendulum/cache-v0"
    make_minari_dataset(dataset_id, pendulum_episodes(2, noise=0.3, seed=5))
    first = common.load_dataset(dataset_id)
    cache = minari_root / dataset_id / "data" / common.CACHE_NAME
    assert cache.exists()
    cache.write_bytes(b"not an npz")  # a damaged cache is rebuilt, never trusted
    again = common.load_dataset(dataset_id)
    np.testing.assert_array_equal(first.observations, again.observations)
    with np.load(cache) as f:
        assert "fingerprint" in f


def test_unwritable_cache_only_warns(minari_root, monkeypatch, capsys):
    dataset_id = "test/invertedpendulum/readonly-v0"
    make_minari_dataset(dataset_id, pendulum_episodes(2, noise=0.3, seed=6))

    def refuse(*_, **__):
        raise OSError("Read-only file system")

    monkeypatch.setattr(common, "_atomic_savez", refuse)
    dataset = common.load_dataset(dataset_id)  # loads, where it once said "delete that folder"
    assert len(dataset) > 0 and "could not write the dataset cache" in capsys.readouterr().err


# ---- validation: each kind of corrupt data gets a clear error naming field and index ----

def _arrays(n=5, obs_dim=4):
    rng = np.random.default_rng(0)
    return {"observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
            "next_observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
            "actions": rng.uniform(-1, 1, size=(n, 1)).astype(np.float32),
            "rewards": np.ones(n, np.float32), "terminals": np.zeros(n, np.float32),
            "episode_ends": np.zeros(n, np.float32)}


@pytest.mark.parametrize("field,value,match", [
    ("rewards", np.nan, r"'rewards' holds a non-finite value .* index 3"),
    ("next_observations", np.inf, r"'next_observations' holds a non-finite value .* index 3"),
    ("actions", 1.5, r"'actions' at index 3 .* outside the action space"),
])
def test_validation_names_field_and_first_bad_index(field, value, match):
    arrays = _arrays()
    arrays[field][3] = value
    arrays[field][4] = value
    with pytest.raises(common.DataError, match=match):
        common.validate_transitions(arrays, (4,), np.array([-1.0]), np.array([1.0]))


def test_validation_mismatched_lengths_and_shapes():
    arrays = _arrays()
    arrays["rewards"] = arrays["rewards"][:4]
    with pytest.raises(common.DataError, match="'rewards' has 4 rows but 'observations' has 5"):
        common.validate_transitions(arrays, (4,), np.array([-1.0]), np.array([1.0]))
    with pytest.raises(common.DataError, match=r"shape \(4,\) per step .* shape \(11,\)"):
        common.validate_transitions(_arrays(), (11,), np.array([-1.0]), np.array([1.0]))
    arrays = _arrays()
    arrays["rewards"] = arrays["rewards"][:, None]  # (n, 1) would broadcast a TD target to (B, B)
    with pytest.raises(common.DataError, match=r"'rewards' has shape \(5, 1\); it must hold one value"):
        common.validate_transitions(arrays, (4,), np.array([-1.0]), np.array([1.0]))
    with pytest.raises(common.DataError, match=r"'actions' has shape \(1,\) per step but the action space has "
                                              r"shape \(2,\)"):
        common.validate_transitions(_arrays(), (4,), -np.ones(2), np.ones(2))
    with pytest.raises(common.DataError, match="not a finite box"):
        common.validate_transitions(_arrays(), (4,), np.array([-np.inf]), np.array([np.inf]))
    common.validate_transitions(_arrays(), (4,), np.array([-1.0]), np.array([1.0]))  # a good one passes


def test_corrupt_datasets_fail_on_load(minari_root):
    eps = pendulum_episodes(2, noise=0.3, seed=1)
    eps[1].observations[7, 2] = np.nan
    make_minari_dataset("test/invertedpendulum/nan-v0", eps)
    with pytest.raises(common.DataError, match=r"'observations' holds a non-finite .* index \d+"):
        common.load_dataset("test/invertedpendulum/nan-v0")

    eps = pendulum_episodes(1, noise=0.3, seed=2)
    eps[0].actions[10] = 5.0  # the box is [-3, 3]
    make_minari_dataset("test/invertedpendulum/badaction-v0", eps)
    with pytest.raises(common.DataError, match="'actions' at index 10"):
        common.load_dataset("test/invertedpendulum/badaction-v0")

    # observations recorded from another environment: Hopper's 11-d states under InvertedPendulum
    import gymnasium as gym
    from minari.data_collector import EpisodeBuffer

    obs = np.random.default_rng(0).normal(size=(6, 11))
    ep = EpisodeBuffer(id=0, observations=obs, actions=np.zeros((5, 1), np.float32), rewards=[1.0] * 5,
                       terminations=[False] * 4 + [True], truncations=[False] * 5)
    make_minari_dataset("test/invertedpendulum/wrongobs-v0", [ep],
                        observation_space=gym.spaces.Box(-np.inf, np.inf, (11,)))
    with pytest.raises(common.DataError, match=r"'observations' has shape \(11,\) .* \(4,\)"):
        common.load_dataset("test/invertedpendulum/wrongobs-v0")

    make_minari_dataset("test/invertedpendulum/truncated-v0", pendulum_episodes(1, noise=0.3, seed=3))
    (minari_root / "test/invertedpendulum/truncated-v0/data/main_data.hdf5").write_bytes(b"\x89HDF garbage")
    with pytest.raises(common.DataError, match="could not be read .* Delete that folder"):
        common.load_dataset("test/invertedpendulum/truncated-v0")


# ---- preprocessing ----

def test_mc_returns_by_hand():
    g = 0.5
    rewards = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    # episode 1 ends by termination at t=2, episode 2 by a time limit at t=4, a trailing cut at t=5
    ends = [0, 0, 1, 0, 1, 0]
    expected = [1 + g * (2 + g * 3), 2 + g * 3, 3, 4 + g * 5, 5, 6]
    np.testing.assert_allclose(cal_ql.mc_returns(rewards, ends, g), expected, rtol=1e-6)


def test_mc_returns_sparse_failure_episodes():
    g = 0.99
    # Cal-QL AntMaze with scale 10, bias -5: failure reward -5, success +5
    rewards = [-5.0, -5.0, -5.0, -5.0, 5.0]
    ends = [0, 1, 0, 0, 1]
    out = cal_ql.mc_returns(rewards, ends, g, sparse_failure_reward=-5.0)
    np.testing.assert_allclose(out[:2], [-500.0, -500.0], rtol=1e-5)  # all-failure episode: r/(1-γ)
    np.testing.assert_allclose(out[2:], [-5 - 5 * g + 5 * g * g, -5 + 5 * g, 5.0], rtol=1e-5)


def test_mc_returns_sparse_failure_after_scaling_offline_equals_online():
    # raw failure reward -1 scaled by 0.1: float32 rewards vs the float64 scaled r_neg differ in the
    # last bit; both the dataset's and an online trajectory's returns must still see a failure
    g, scale = 0.99, 0.1
    rewards = np.float32(-1.0) * np.ones(4, np.float32) * scale
    failure = -1.0 * scale
    offline = cal_ql.mc_returns(rewards, [0, 0, 0, 1], g, sparse_failure_reward=failure)
    online = cal_ql.trajectory_mc_returns(jnp.asarray(np.r_[rewards, 0.0], jnp.float32), 4, g, failure)
    np.testing.assert_allclose(offline, np.full(4, failure / (1 - g)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(online)[:4], offline, rtol=1e-5)
    assert float(online[4]) == 0.0  # past the trajectory

def test_normalized_score_formula(hopper_tiny):
    ds = common.load_dataset(hopper_tiny)
    lo, hi = ds.ref_min_score, ds.ref_max_score
    assert (lo, hi) == (-20.272305, 3234.3)  # D4RL's hopper constants
    np.testing.assert_allclose(ds.normalized_score([lo, hi, (lo + hi) / 2]), [0.0, 100.0, 50.0])
    import minari

    np.testing.assert_allclose(ds.normalized_score([1000.0]) / 100,
                               minari.get_normalized_score(minari.load_dataset(hopper_tiny), np.array([1000.0])))


def test_episode_returns_and_iql_scale():
    ds = common.Dataset(id="x", observations=np.zeros((5, 1)), actions=np.zeros((5, 1)),
                        rewards=np.array([1.0, 2.0, 3.0, 4.0, 10.0]), next_observations=np.zeros((5, 1)),
                        terminals=np.zeros(5), episode_ends=np.array([0, 1, 0, 1, 0]), env_spec=None,
                        action_low=np.array([-1.0]), action_high=np.array([1.0]))
    np.testing.assert_allclose(ds.episode_returns(), [3.0, 7.0, 10.0])
    assert iql.locomotion_reward_scale(ds) == pytest.approx(1000.0 / 7.0)


def test_obs_stats_and_unit_box():
    rng = np.random.default_rng(0)
    a = rng.uniform(-3, 3, size=(100, 1))
    low, high = np.array([-3.0]), np.array([3.0])
    np.testing.assert_allclose(common.from_unit_box(common.to_unit_box(a, low, high), low, high), a, atol=1e-12)
    np.testing.assert_allclose(common.to_unit_box(np.array([[-3.0], [0.0], [3.0]]), low, high), [[-1], [0], [1]])


def test_offlax_build_is_deterministic(minari_root):
    import shutil

    arrays = []
    for _ in range(2):
        path = minari_root / "offlax/walker2d/random-v0"
        shutil.rmtree(path, ignore_errors=True)
        offlax_suite.build_offlax_dataset("offlax/walker2d/random-v0", scale=0.001, progress=False)
        arrays.append(common.load_dataset("offlax/walker2d/random-v0").arrays())
    for k in common.FIELDS:
        np.testing.assert_array_equal(arrays[0][k], arrays[1][k])
    assert 0 < len(arrays[0]["rewards"]) <= 1000
    assert arrays[0]["episode_ends"][-1] == 1  # the trailing partial episode was dropped


def test_missing_offlax_id_is_built_on_first_use(minari_root, monkeypatch):
    manifest = offlax_suite.load_policy_manifest()
    manifest["datasets"]["halfcheetah/random"] = [["halfcheetah/random", 1000]]  # a tiny recipe
    monkeypatch.setattr(offlax_suite, "load_policy_manifest", lambda: manifest)
    ds = common.load_dataset("offlax/halfcheetah/random-v0")
    assert len(ds) == 1000 and ds.episode_ends.sum() == 1  # HalfCheetah never terminates
    assert ds.ref_max_score == 12135.0


def test_medium_expert_reuses_built_parts_and_equals_a_fresh_build(minari_root):
    """medium-expert = medium followed by expert: built from the stored parts (after checking
    them) it equals a build that collects everything again."""
    import shutil

    ids = [f"offlax/hopper/{q}-v0" for q in ("medium", "expert", "medium-expert")]
    for i in ids:
        shutil.rmtree(minari_root / i, ignore_errors=True)
    offlax_suite.build_offlax_dataset(ids[2], scale=0.002, progress=False)  # nothing to reuse: collected
    fresh = common.load_dataset(ids[2]).arrays()
    shutil.rmtree(minari_root / ids[2])
    for i in ids[:2]:
        offlax_suite.build_offlax_dataset(i, scale=0.002, progress=False)
    calls = []
    original = offlax_suite.collect_episodes
    offlax_suite.collect_episodes = lambda *a, **k: calls.append(a[2]) or original(*a, **k)
    try:
        offlax_suite.build_offlax_dataset(ids[2], scale=0.002, progress=False)
    finally:
        offlax_suite.collect_episodes = original
    reused = common.load_dataset(ids[2]).arrays()
    assert max(calls) < 2000  # only the one-episode checks ran, not the 2,000-step segments
    for k in common.FIELDS:
        np.testing.assert_array_equal(fresh[k], reused[k])
