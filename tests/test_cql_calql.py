"""CQL and Cal-QL: the regulariser by hand, Cal-QL's clipping and its gradient mask, conservatism
as a known behaviour, offline and online smoke runs of both scripts."""

import dataclasses
import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import q1_param_count
from scipy.special import logsumexp

import common
from algorithms import cal_ql, cql


def test_cql_regularizer_by_hand():
    rng = np.random.default_rng(0)
    B, N, A = 3, 2, 2
    q_data = rng.normal(size=(2, B))
    q_rand, q_cur, q_next = (rng.normal(size=(2, B, N)) for _ in range(3))
    logp_cur, logp_next = rng.normal(size=(B, N)), rng.normal(size=(B, N))
    gap = cql.cql_regularizer(q_data, q_rand, q_cur, q_next, logp_cur, logp_next, A, 1.0, True)
    for i in range(2):
        for b in range(B):
            terms = np.concatenate([q_rand[i, b] - A * np.log(0.5), q_next[i, b] - logp_next[b],
                                    q_cur[i, b] - logp_cur[b]])
            assert gap[i, b] == pytest.approx(logsumexp(terms) - q_data[i, b], rel=1e-5)
    # temperature T: T·logsumexp(x / T)
    gap_t = cql.cql_regularizer(q_data, q_rand, q_cur, q_next, logp_cur, logp_next, A, 2.0, True)
    terms = np.concatenate([q_rand[0, 0] - A * np.log(0.5), q_next[0, 0] - logp_next[0], q_cur[0, 0] - logp_cur[0]])
    assert gap_t[0, 0] == pytest.approx(2.0 * logsumexp(terms / 2.0) - q_data[0, 0], rel=1e-5)
    # without importance sampling: plain logsumexp over [rand, data, next, cur]
    gap_n = cql.cql_regularizer(q_data, q_rand, q_cur, q_next, logp_cur, logp_next, A, 1.0, False)
    terms = np.concatenate([q_rand[1, 2], [q_data[1, 2]], q_next[1, 2], q_cur[1, 2]])
    assert gap_n[1, 2] == pytest.approx(logsumexp(terms) - q_data[1, 2], rel=1e-5)
    # Cal-QL without a binding bound is exactly CQL
    gap_c, rate = cal_ql.cql_regularizer(q_data, q_rand, q_cur, q_next, logp_cur, logp_next, A, 1.0, True,
                                         mc_lower=np.full(B, -1e9))
    np.testing.assert_allclose(gap_c, gap, rtol=1e-6)
    assert float(rate) == 0.0


def test_calql_clipping_and_gradient_mask():
    """Policy Q-values below the MC return are lifted to it, and no gradient flows to them; random
    actions and the data action are never clipped."""
    q_data = jnp.zeros((2, 1))
    q_rand = jnp.array([[[-5.0, 0.5]], [[-5.0, 0.5]]])
    q_cur = jnp.array([[[-3.0, 2.0]], [[1.5, -0.5]]])
    q_next = jnp.array([[[0.0, 4.0]], [[-2.0, 3.0]]])
    logp = jnp.zeros((1, 2))
    lower = jnp.array([1.0])

    def total(q_rand, q_cur, q_next):
        gap, _ = cal_ql.cql_regularizer(q_data, q_rand, q_cur, q_next, logp, logp, 2, 1.0, True, mc_lower=lower)
        return gap.sum()

    _, rate = cal_ql.cql_regularizer(q_data, q_rand, q_cur, q_next, logp, logp, 2, 1.0, True, mc_lower=lower)
    assert float(rate) == pytest.approx(0.5)  # 4 of the 8 policy Q-values lie below the bound
    g_rand, g_cur, g_next = jax.grad(total, argnums=(0, 1, 2))(q_rand, q_cur, q_next)
    np.testing.assert_array_equal(np.asarray(g_cur) == 0, np.asarray(q_cur) < 1.0)
    np.testing.assert_array_equal(np.asarray(g_next) == 0, np.asarray(q_next) < 1.0)
    assert np.all(np.asarray(g_rand) > 0)  # uniform actions: never clipped
    # the clipped logsumexp equals the hand value with max(Q, G) in place of Q
    clipped = np.concatenate([np.array([-5.0, 0.5]) - 2 * np.log(0.5), [1.0, 4.0], [1.0, 2.0]])
    gap, _ = cal_ql.cql_regularizer(q_data, q_rand, q_cur, q_next, logp, logp, 2, 1.0, True, mc_lower=lower)
    assert float(gap[0, 0]) == pytest.approx(logsumexp(clipped), rel=1e-5)


def _agent(module, obs_dim, act_dim, **overrides):
    args = dataclasses.replace(module.Args(), hidden=(32, 32), critic_hidden=(32, 32), batch_size=64,
                               cql_n_actions=4, gamma=0.9, policy_lr=1e-3, qf_lr=1e-3, polyak=0.02, **overrides)
    agent = module.Agent(actor=module.Actor(args.hidden, act_dim, args.orthogonal_init),
                         critic=module.TwinCritic(args.critic_hidden, args.orthogonal_init, args.critic_layernorm),
                         actor_tx=optax.adam(args.policy_lr), critic_tx=optax.adam(args.qf_lr),
                         alpha_tx=optax.adam(args.policy_lr), alpha_prime_tx=optax.adam(args.qf_lr), args=args,
                         action_dim=act_dim, target_entropy=-float(act_dim))
    return agent


@pytest.mark.parametrize("module", [cql, cal_ql])
@pytest.mark.parametrize("orthogonal", [False, True])
def test_initial_policy_centred_and_q_near_zero(module, orthogonal):
    """Both initialisations end in a small output layer (JaxCQL's): tanh(mean) near 0, log σ near the
    offset −1, Q near 0. Flax's default output kernel would give |mean| and Q of order 1."""
    obs = jax.random.normal(jax.random.PRNGKey(1), (1000, 17)) * 3.0
    actor, critic = module.Actor((256, 256), 6, orthogonal), module.TwinCritic((256, 256), orthogonal)
    mean, log_std = actor.apply(actor.init(jax.random.PRNGKey(0), obs), obs)
    q = critic.apply(critic.init(jax.random.PRNGKey(0), obs, mean), obs, jnp.tanh(mean))
    assert float(jnp.sqrt(jnp.mean(mean ** 2))) < 0.3  # flax's default output kernel: about 1.3 here
    assert abs(float(log_std.mean()) + 1.0) < 0.1 and float(log_std.std()) < 0.3
    assert float(jnp.abs(q).max()) < 1.0


def _q_at_policy(module, agent, state, data):
    actions = jnp.tanh(agent.actor.apply(state.actor_params, data["observations"])[0])
    return float(agent.critic.apply(state.critic_params, data["observations"], actions).min(0).mean())


def test_conservatism_cql_below_sac_and_calql_above_mc_bound(pendulum_dataset):
    """Known behaviour on a small dataset: CQL's Q at the policy's actions ends below the plain
    (w = 0, SAC) critic's; Cal-QL's stays at or above the Monte-Carlo returns it is clipped by.
    (Measured: SAC's offline Q diverges to about 1,000 where the true value is at most 10; CQL ends
    near 9.5, below the data's mean MC return 9.9; Cal-QL near 13.)"""
    ds = common.load_dataset(pendulum_dataset)
    gamma = 0.9
    mc = cal_ql.mc_returns(ds.rewards, ds.episode_ends, gamma)
    data = common.device_arrays(ds, extra={"mc_returns": mc})
    q = {}
    for name, module, weight in [("sac", cql, 0.0), ("cql", cql, 5.0), ("cal_ql", cal_ql, 5.0)]:
        agent = _agent(module, 4, 1, cql_weight=weight)
        state = module.create_state(jax.random.PRNGKey(0), agent, 4)
        d = data if module is cal_ql else {k: v for k, v in data.items() if k != "mc_returns"}
        state, _ = jax.jit(partial(module.train_chunk, agent=agent, num_updates=1500))(state, d)
        q[name] = _q_at_policy(module, agent, state, data)
    mc_mean = float(np.mean(mc))  # about 1/(1 − γ) = 10: every step earns 1
    assert q["cql"] < q["sac"] - 1.0, q
    assert q["cal_ql"] >= mc_mean - 0.5, (q, mc_mean)
    assert q["cql"] < mc_mean, (q, mc_mean)  # CQL alone ends below the behaviour's value
    assert q["cql"] < q["cal_ql"] - 1.0, q  # the calibration is what holds Cal-QL up


def _rows(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("module", [cql, cal_ql])
def test_offline_and_online_smoke(module, tmp_path, hopper_tiny):
    summary = module.main(module.Args(dataset=hopper_tiny, total_steps=100, eval_every=100, online_steps=200,
                                      num_seeds=2, eval_episodes=1, hidden=(16, 16), critic_hidden=(16, 16),
                                      cql_n_actions=2, batch_size=32, runs_dir=str(tmp_path), checkpoint_every=100,
                                      cql_lagrange=True, seem_every=100))
    rows = _rows(summary["run"])
    assert rows[0]["seem_num_params"] == [q1_param_count(11 + 3, (16, 16))] * 2  # Q1's alone
    assert [(r["step"], r["phase"]) for r in rows] == [(100, "offline"), (200, "online"), (300, "online")]
    # Hopper episodes under a random policy end within 200 steps: whole trajectories were learned on
    assert sum(sum(r["num_updates"]) for r in rows[1:]) > 0
    assert np.isfinite(summary["last_mean"])
    if module is cal_ql:
        assert "bound_rate" in rows[0]
