"""Buffers, checkpoints and the run machinery of common.py."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common


@dataclasses.dataclass
class Args:  # the fields common.Run reads from a script's Args
    runs_dir: str
    seed: int = 0
    num_seeds: int = 2
    resume: str | None = None
    wandb: bool = False
    dataset: str = "d/x-v0"
    last_evals: int = 1
    eval_every: int = 100
    seem_every: int = 0


def _offline(n=1000):
    return {"observations": jnp.arange(n, dtype=jnp.float32)[:, None], "rewards": jnp.ones(n)}


@pytest.mark.parametrize("fraction,expected", [(0.5, 128), (0.25, 64), (0.0, 0), (1.0, 256), (0.3, 77)])
def test_mixed_sampler_fraction_is_exact(fraction, expected):
    buf = common.ReplayBuffer.create({"observations": jnp.zeros(1), "rewards": jnp.zeros(())}, capacity=50)
    buf = buf.add({"observations": -jnp.ones((30, 1)), "rewards": jnp.zeros(30)})  # online rows: reward 0
    sample = jax.jit(lambda k: common.sample_mixed(k, _offline(), buf, 256, fraction))
    for i in range(5):
        batch = sample(jax.random.PRNGKey(i))
        assert batch["rewards"].shape == (256,)
        assert int(batch["rewards"].sum()) == expected  # offline rows carry reward 1
        online_obs = batch["observations"][batch["rewards"] == 0]
        assert bool(jnp.all(online_obs == -1))  # online rows only from the filled part of the buffer


def test_replay_buffer_ring_and_seeding():
    example = {"x": jnp.zeros(2)}
    buf = common.ReplayBuffer.create(example, capacity=5, initial={"x": jnp.ones((3, 2))})
    assert int(buf.size) == 3 and int(buf.pos) == 3
    buf = jax.jit(lambda b, t: b.add(t))(buf, {"x": jnp.full((4, 2), 7.0)})
    assert int(buf.size) == 5 and int(buf.pos) == 2
    np.testing.assert_array_equal(buf.data["x"][:, 0], [7, 7, 1, 7, 7])  # the two oldest overwritten
    with pytest.raises(ValueError, match="capacity 2 is smaller"):
        common.ReplayBuffer.create(example, capacity=2, initial={"x": jnp.ones((3, 2))})
    with pytest.raises(ValueError, match="adding 6 transitions at once to a buffer of capacity 5"):
        buf.add({"x": jnp.ones((6, 2))})


def test_resume_without_checkpoint_and_bad_run_args_are_refused(tmp_path):
    run = common.Run("test", Args(runs_dir=str(tmp_path)), total_steps=200)  # config.json, no checkpoint yet
    with pytest.raises(SystemExit, match="no checkpoint.npz there .* without --resume"):
        common.resume_args(Args(runs_dir=str(tmp_path), resume=str(run.dir)))
    with pytest.raises(SystemExit, match="--last-evals must be at least 1"):
        common.check_run_args(Args(runs_dir=str(tmp_path), last_evals=0))
    with pytest.raises(SystemExit, match=r"--seem-every \(150\) must be a non-negative multiple of --eval-every"):
        common.check_run_args(Args(runs_dir=str(tmp_path), seem_every=150))
    common.check_run_args(Args(runs_dir=str(tmp_path), seem_every=200))  # a good one passes


def test_replay_buffer_adds_only_the_first_count_rows():
    buf = common.ReplayBuffer.create({"x": jnp.zeros(())}, capacity=6)
    buf = buf.add({"x": jnp.ones(4)}, count=0)  # a trajectory still being collected: nothing added
    assert int(buf.size) == 0 and int(buf.pos) == 0
    add = jax.jit(lambda b, t, n: b.add(t, count=n))
    buf = add(buf, {"x": jnp.arange(1.0, 5.0)}, 3)  # rows 0-2 <- 1, 2, 3 (the 4 is not added)
    buf = add(buf, {"x": jnp.arange(10.0, 14.0)}, jnp.asarray(4))  # rows 3, 4, 5, 0 <- 10..13
    np.testing.assert_array_equal(np.asarray(buf.data["x"]), [13.0, 2.0, 3.0, 10.0, 11.0, 12.0])
    assert int(buf.size) == 6 and int(buf.pos) == 1


def test_sample_batch_is_uniform_over_the_data():
    data = _offline(10)
    batch = common.sample_batch(jax.random.PRNGKey(0), data, 20000)
    counts = np.bincount(np.asarray(batch["observations"][:, 0], int), minlength=10)
    assert counts.min() > 1800 and counts.max() < 2200


def test_checkpoint_roundtrip_and_atomic(tmp_path):
    import optax

    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.zeros(3)}
    state = {"params": params, "opt": optax.adam(1e-3).init(params), "key": jax.random.PRNGKey(3),
             "buffer": common.ReplayBuffer.create({"x": jnp.zeros(2)}, 4)}
    path = tmp_path / "checkpoint.npz"
    common.save_checkpoint(path, state, step=1234)
    assert not list(tmp_path.glob("*.tmp"))
    template = jax.tree.map(jnp.zeros_like, state)
    restored, step, extra = common.load_checkpoint(path, template)
    assert extra == {}
    assert step == 1234
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    with pytest.raises(ValueError, match="different model"):
        common.load_checkpoint(path, {"other": jnp.zeros(1)})


def test_divergence_guard_names_step_and_quantity_and_keeps_checkpoint(tmp_path):
    run = common.Run("test", Args(runs_dir=str(tmp_path)), total_steps=200)
    run.save({"w": jnp.ones(2)}, 100)
    q = np.zeros((2, 100))
    q[1, 37:] = np.nan  # seed 1 goes bad at the 38th update of the chunk (100, 200]
    with pytest.raises(common.DivergenceError, match=r"q_mean became nan at update 138 \(seed 1\)") as err:
        run.log(200, {"loss": np.zeros((2, 100)), "q_mean": q})
    assert str(run.ckpt) in str(err.value)
    _, step, _ = common.load_checkpoint(run.ckpt, {"w": jnp.zeros(2)})
    assert step == 100  # the last good checkpoint is untouched
    assert json.loads((run.dir / "diverged.json").read_text()) == {"step": 138, "quantity": "q_mean", "seed": 1}


def test_run_summary_last_and_best(tmp_path):
    run = common.Run("test", Args(runs_dir=str(tmp_path), seed=5, last_evals=2), total_steps=300)
    for step, rets in [(100, [[1, 3], [5, 5]]), (200, [[9, 9], [2, 2]]), (300, [[4, 4], [6, 8]])]:
        run.log(step, {"loss": np.zeros((2, 1))}, np.array(rets, float))
    s = run.finish()
    assert s["measure"] == "raw return"  # no dataset, so no normalised score
    np.testing.assert_allclose(s["last_per_seed"], [(9 + 4) / 2, (2 + 7) / 2])  # mean of the last 2 evals
    np.testing.assert_allclose(s["best_per_seed"], [9, 7])
    assert json.loads((run.dir / "summary.json").read_text())["best_mean"] == 8


@pytest.mark.parametrize("env_id", ["AntMaze_UMaze-v5", "AdroitHandPen-v1", "AdroitHandDoor-v1",
                                    "AdroitHandRelocate-v1", "AdroitHandHammer-v1", "Hopper-v5", "Ant-v5",
                                    "Humanoid-v5", "Pendulum-v1"])
def test_env_state_snapshot_continues_exactly(env_id):
    """A snapshot restored into other environments (other seeds, other steps) continues bit for bit:
    besides MuJoCo's integration state this needs AntMaze's goal, the model fields Adroit sets at
    reset (pen orientation, door, object and nail positions), Adroit pen's target length, and the
    positions and contact forces MuJoCo derived in the last step (Ant's and Humanoid's rewards read them)."""
    import gymnasium as gym
    import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)

    def make():
        env = gym.make(env_id, max_episode_steps=60)  # short episodes: the autoreset RNG is exercised too
        return gym.wrappers.FlattenObservation(env) if isinstance(env.observation_space, gym.spaces.Dict) else env

    def roll(envs, actions):
        return [tuple(np.copy(x) for x in envs.step(a)[:4]) for a in actions]

    original = common.vector_env(make, 2)
    original.reset(seed=[3, 4])
    rng = np.random.default_rng(0)
    space = original.action_space
    actions = [rng.uniform(space.low, space.high).astype(space.dtype) for _ in range(100)]
    roll(original, actions[:30])
    blob = common.get_env_states(original)
    expected = roll(original, actions[30:])
    other = common.vector_env(make, 2)
    other.reset(seed=[11, 12])
    roll(other, actions[:7])
    common.set_env_states(other, blob)
    for t, (want, got) in enumerate(zip(expected, roll(other, actions[30:]))):
        for name, w, g in zip(("obs", "reward", "terminated", "truncated"), want, got):
            np.testing.assert_array_equal(g, w, err_msg=f"{name} at step {t} after the restore")


def test_snapshot_check_flags_state_kept_elsewhere():
    import gymnasium as gym
    from gymnasium.envs.classic_control.pendulum import PendulumEnv

    class Memory(PendulumEnv):  # a reward that depends on a list the snapshot does not save
        def reset(self, **kw):
            self.history = []
            return super().reset(**kw)

        def step(self, action):
            obs, r, term, trunc, info = super().step(action)
            self.history.append(float(action[0]))
            return obs, r - 0.1 * sum(self.history), term, trunc, info

    assert common.snapshot_mismatch(lambda: gym.make("Pendulum-v1")) is None
    problem = common.snapshot_mismatch(lambda: gym.wrappers.TimeLimit(Memory(), 200))
    assert problem == "the reward differs at step 1 after a restore"


def test_old_checkpoint_format_still_restores():
    """Checkpoints written before the snapshot kept attributes, model fields and derived arrays
    (one RNG state, no 'attrs'/'model'/'derived') still restore a Hopper exactly."""
    import pickle

    import gymnasium as gym

    make = lambda: gym.make("Hopper-v5")  # noqa: E731
    a, b = common.vector_env(make, 1), common.vector_env(make, 1)
    a.reset(seed=1)
    b.reset(seed=2)
    rng = np.random.default_rng(0)
    actions = [rng.uniform(-1, 1, (1, 3)).astype(np.float32) for _ in range(20)]
    for act in actions[:5]:
        a.step(act)
    (state,) = pickle.loads(common.get_env_states(a).tobytes())
    old = {"rng": state["rng"][0], "elapsed": state["elapsed"], "mujoco": state["mujoco"]}
    common.set_env_states(b, np.frombuffer(pickle.dumps([old]), np.uint8))
    for act in actions[5:]:
        np.testing.assert_array_equal(a.step(act)[0], b.step(act)[0])


def test_environment_without_savable_state_is_refused_up_front():
    import gymnasium as gym

    class Opaque(gym.Env):  # neither MuJoCo nor classic control: no way to snapshot it
        observation_space = gym.spaces.Box(-1, 1, (1,))
        action_space = gym.spaces.Box(-1, 1, (1,))

        def reset(self, seed=None, options=None):
            super().reset(seed=seed)
            return np.zeros(1, np.float32), {}

        def step(self, action):
            return np.zeros(1, np.float32), 0.0, False, False, {}

    envs = common.vector_env(lambda: gym.wrappers.TimeLimit(Opaque(), 10), 2)
    envs.reset(seed=0)
    with pytest.raises(common.DataError, match="cannot be saved"):
        common.get_env_states(envs)
