"""SAC: the update's losses by hand, the tanh-Gaussian log-probability, policy export, exact resume,
and a learning check."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import q1_param_count, random_batch

from benchmarks import offlax_suite
from algorithms import sac

TIMING = ("steps_per_s", "compile_s")


def _rows(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _args(tmp_path, **kw):
    base = dict(env_id="InvertedPendulum-v5", total_steps=2000, eval_every=500, checkpoint_every=500,
                learning_starts=300, eval_episodes=2, hidden=(32, 32), runs_dir=str(tmp_path), batch_size=64)
    base.update(kw)
    return sac.Args(**base)


def test_log_prob_matches_change_of_variables():
    """log π(a|s) of the squashed Gaussian against the closed form with the Jacobian of tanh."""
    actor = sac.Actor((8,), 2)
    params = actor.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))
    obs = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
    a, logp = sac.sample_action(actor, params, obs, jax.random.PRNGKey(2))
    mean, log_std = actor.apply(params, obs)
    u = np.arctanh(np.clip(np.asarray(a, np.float64), -1 + 1e-7, 1 - 1e-7))
    std = np.exp(np.asarray(log_std, np.float64))
    gauss = -0.5 * ((u - np.asarray(mean)) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)
    expected = np.sum(gauss - np.log(1 - np.tanh(u) ** 2), axis=-1)
    np.testing.assert_allclose(logp, expected, rtol=1e-3, atol=1e-3)


def test_update_losses_by_hand():
    """One SAC update against its losses written out in numpy: the soft target with the entropy term
    and the smaller target critic, the summed twin-critic MSE, the actor against the *updated* critics,
    the temperature loss at the pre-update actor's log-probabilities, and the Polyak step."""
    args = _args("unused", hidden=(16,), gamma=0.9, tau=0.3, init_alpha=0.5)
    agent = sac.make_agent(args, 3, 2)
    state = sac.create_state(jax.random.PRNGKey(0), agent, 3, 2, args)
    # a target unlike the critic, so that using the wrong one shows
    state = state.replace(target_critic_params=jax.tree.map(lambda x: 0.5 * x + 0.1, state.target_critic_params))
    batch = random_batch()
    new, m = sac.update(state, batch, agent)

    _, k_next, k_pi = jax.random.split(state.key, 3)
    alpha = 0.5
    q = lambda params, s, a: np.asarray(agent.critic.apply(params, s, a), np.float64)  # noqa: E731
    next_a, next_logp = sac.sample_action(agent.actor, state.actor_params, batch["next_observations"], k_next)
    soft_next = q(state.target_critic_params, batch["next_observations"], next_a).min(0) - alpha * np.asarray(next_logp)
    y = batch["rewards"] + 0.9 * (1 - batch["terminals"]) * soft_next
    critic_loss = sum(np.mean((qi - y) ** 2) for qi in q(state.critic_params, batch["observations"], batch["actions"]))
    a_pi, logp = sac.sample_action(agent.actor, state.actor_params, batch["observations"], k_pi)
    actor_loss = np.mean(alpha * np.asarray(logp) - q(new.critic_params, batch["observations"], a_pi).min(0))
    alpha_loss = -alpha * np.mean(np.asarray(logp) - 2.0)  # target entropy H̄ = −|A| = −2
    assert float(m["critic_loss"]) == pytest.approx(critic_loss, rel=1e-5)
    assert float(m["actor_loss"]) == pytest.approx(actor_loss, rel=1e-5)
    assert float(m["alpha_loss"]) == pytest.approx(alpha_loss, rel=1e-5)
    for t_new, c_new, t_old in zip(jax.tree.leaves(new.target_critic_params), jax.tree.leaves(new.critic_params),
                                   jax.tree.leaves(state.target_critic_params)):
        np.testing.assert_allclose(t_new, 0.3 * np.asarray(c_new) + 0.7 * np.asarray(t_old), rtol=1e-5, atol=1e-6)


def test_exported_policy_acts_like_the_actor(tmp_path):
    actor = sac.Actor((16, 16), 3)
    params = actor.init(jax.random.PRNGKey(0), jnp.zeros((1, 11)))
    sac.export_policy(params, tmp_path / "p.npz", (16, 16), 3)
    policy = dict(np.load(tmp_path / "p.npz"))
    policy["kind"] = "tanh_gaussian"
    obs = np.random.default_rng(0).normal(size=(4, 11)).astype(np.float32)
    mean, log_std = actor.apply(params, obs)

    class ZeroNoise:  # with zero noise the stored policy must return tanh(mean)
        def standard_normal(self, shape, dtype):
            return np.zeros(shape, dtype)

    low, high = -np.ones(3, np.float32), np.ones(3, np.float32)
    np.testing.assert_allclose(offlax_suite.policy_actions(policy, obs, ZeroNoise(), low, high), np.tanh(mean), atol=1e-5)
    h = np.maximum(np.maximum(obs @ policy["hidden_0_w"] + policy["hidden_0_b"], 0) @ policy["hidden_1_w"]
                   + policy["hidden_1_b"], 0)
    np.testing.assert_allclose(np.clip(h @ policy["log_std_w"] + policy["log_std_b"], -5, 2), log_std, atol=1e-5)


def test_sac_resume_equals_uninterrupted(tmp_path, interrupt_after):
    """Exact resume of an online run: agent, replay buffer, RNG keys and the environments' state."""
    full = _rows(sac.main(_args(tmp_path / "full", num_seeds=2))["run"])
    interrupt_after(1000)
    with pytest.raises(KeyboardInterrupt):
        sac.main(_args(tmp_path / "cut", num_seeds=2))
    (run_dir,) = (tmp_path / "cut").iterdir()
    resumed = _rows(sac.main(sac.Args(resume=str(run_dir)))["run"])
    assert [r["step"] for r in resumed] == [500, 1000, 1500, 2000]
    for a, b in zip(full, resumed):
        assert a == b


def test_sac_snapshots_are_written(tmp_path):
    summary = sac.main(_args(tmp_path, total_steps=1000, snapshot_every=500, seem_every=500))
    names = sorted(p.name for p in (Path(summary["run"]) / "policies").iterdir())
    assert names == ["step_0000500_seed0.npz", "step_0001000_seed0.npz"]
    rows = _rows(summary["run"])
    assert [r["seem_num_params"] for r in rows] == [[q1_param_count(4 + 1, (32, 32))]] * 2  # Q1's alone


def test_sac_learns_pendulum(tmp_path):
    """SAC swings up and holds Pendulum-v1 within 6,000 steps: the last evaluations average above
    -400, where uniform random actions score about -1200 (the first evaluation, after the random
    warm-up, is that bad too)."""
    summary = sac.main(_args(tmp_path, env_id="Pendulum-v1", total_steps=6000, eval_every=1000,
                             checkpoint_every=6000, learning_starts=1000, hidden=(64, 64), batch_size=128,
                             actor_lr=1e-3, critic_lr=1e-3, alpha_lr=1e-3, eval_episodes=5, last_evals=2))
    rows = _rows(summary["run"])
    assert rows[0]["return_mean"] < -1000
    assert summary["last_mean"] > -400, summary


def test_sac_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match=r"--checkpoint-every \(700\) must be a non-negative multiple of --eval-every"):
        sac.main(_args(tmp_path, checkpoint_every=700))


def test_vmapped_seeds_equal_single_seed_runs(tmp_path):
    """Two seeds in one vmapped process act, learn and evaluate as two separate runs would:
    per-seed keys, per-seed environment resets and per-seed buffers never mix."""
    kw = dict(total_steps=800, eval_every=400, checkpoint_every=400)
    both = _rows(sac.main(_args(tmp_path / "a", seed=3, num_seeds=2, **kw))["run"])
    one = _rows(sac.main(_args(tmp_path / "b", seed=3, **kw))["run"])
    two = _rows(sac.main(_args(tmp_path / "c", seed=4, **kw))["run"])
    for rb, r1, r2 in zip(both, one, two):
        np.testing.assert_allclose(rb["critic_loss"], r1["critic_loss"] + r2["critic_loss"], rtol=1e-3)
        np.testing.assert_allclose(rb["returns"], r1["returns"] + r2["returns"], rtol=1e-3)
