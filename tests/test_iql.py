"""IQL: losses against hand-computed values, known answers on tiny problems, smoke runs."""

import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import q1_param_count

import common
from algorithms import iql


def make_agent(obs_dim, act_dim, *, expectile=0.7, temperature=3.0, gamma=0.99, polyak=0.005, hidden=(32, 32),
               lr=1e-3, batch_size=64, layernorm=False, decay_over=None):
    """A small agent; with `decay_over` the learning rates decay to 0 (cosine) over that many updates,
    so that stochastic batches settle on the fixed point of the expected loss."""
    if decay_over:
        lr = optax.cosine_decay_schedule(lr, decay_over)
    return iql.Agent(actor=iql.Actor(hidden, act_dim), critic=iql.TwinCritic(hidden, layernorm),
                     value=iql.ValueCritic(hidden, layernorm), actor_tx=optax.adam(lr), critic_tx=optax.adam(lr),
                     value_tx=optax.adam(lr), expectile=expectile, temperature=temperature, gamma=gamma,
                     polyak=polyak, batch_size=batch_size)


def train(agent, data, updates, seed=0):
    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    state = iql.create_state(jax.random.PRNGKey(seed), agent, obs_dim, act_dim)
    state, metrics = jax.jit(partial(iql.train_chunk, agent=agent, num_updates=updates))(state, data)
    return state, metrics


def analytic_expectile(values, tau):
    """Solves τ Σ_{x>v} (x − v) = (1 − τ) Σ_{x<v} (v − x) for v by bisection."""
    lo, hi = min(values), max(values)
    for _ in range(100):
        v = (lo + hi) / 2
        g = tau * sum(max(x - v, 0) for x in values) - (1 - tau) * sum(max(v - x, 0) for x in values)
        lo, hi = (v, hi) if g > 0 else (lo, v)
    return v


def test_expectile_loss_by_hand():
    u = jnp.array([2.0, -1.0, 0.5, -3.0])
    # τ = 0.7: positive residuals weigh 0.7, negative ones 0.3
    np.testing.assert_allclose(iql.expectile_loss(u, 0.7), [0.7 * 4, 0.3 * 1, 0.7 * 0.25, 0.3 * 9], rtol=1e-6)
    np.testing.assert_allclose(iql.expectile_loss(u, 0.5), 0.5 * u ** 2, rtol=1e-6)


def test_advantage_weights_clip_at_100():
    q, v = jnp.array([0.0, 1.0, 10.0, -1.0]), jnp.zeros(4)
    w = iql.advantage_weights(q, v, temperature=3.0)
    np.testing.assert_allclose(w, [1.0, np.exp(3.0), 100.0, np.exp(-3.0)], rtol=1e-5)


def test_actor_log_prob_closed_form():
    """The authors' actor: N(tanh(μ(s)), σ²) with a state-independent σ, no tanh squashing."""
    actor = iql.Actor((8,), 2)
    params = actor.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))
    params["params"]["log_std"] = jnp.array([-0.5, 0.3])
    obs = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    a = jnp.array([[0.1, -0.2], [0.9, 0.0], [-0.5, 0.5], [0.0, 0.0]])
    mean, log_std = actor.apply(params, obs)
    assert np.all(np.abs(mean) < 1) and np.allclose(log_std, [-0.5, 0.3])
    sigma = np.exp([-0.5, 0.3])
    expected = np.sum(-0.5 * ((np.asarray(a) - np.asarray(mean)) / sigma) ** 2 - np.log(sigma * np.sqrt(2 * np.pi)), -1)
    np.testing.assert_allclose(iql.gaussian_log_prob(mean, log_std, a), expected, rtol=1e-5)
    # log-std is clipped to [-5, 2]
    params["params"]["log_std"] = jnp.array([-9.0, 7.0])
    np.testing.assert_allclose(actor.apply(params, obs)[1], [-5.0, 2.0])


@pytest.mark.parametrize("tau", [0.5, 0.7, 0.9])
def test_value_converges_to_the_analytic_expectile(tau):
    """One state, four actions with rewards {0, 1, 2, 10}, every transition terminal: Q(s, a_i)
    learns r_i and V(s) the τ-expectile of {r_i} (a known answer, far from the mean for τ = 0.9)."""
    rewards = [0.0, 1.0, 2.0, 10.0]
    data = {"observations": jnp.ones((4, 1)), "next_observations": jnp.ones((4, 1)),
            "actions": jnp.array([[-0.75], [-0.25], [0.25], [0.75]]), "rewards": jnp.array(rewards),
            "terminals": jnp.ones(4)}
    agent = make_agent(1, 1, expectile=tau, polyak=0.05, lr=3e-3, decay_over=4000)
    state, _ = train(agent, data, 4000)
    v = float(agent.value.apply(state.value_params, jnp.ones((1, 1)))[0])
    q = agent.critic.apply(state.critic_params, data["observations"], data["actions"])
    np.testing.assert_allclose(q, np.tile(rewards, (2, 1)), atol=0.1)
    assert v == pytest.approx(analytic_expectile(rewards, tau), abs=0.05)


def test_q_reaches_the_fixed_point_of_a_small_mdp():
    """A two-state cycle s0 -(r=1)-> s1 -(r=0)-> s0, never terminal, one action per state: V(s)
    equals Q(s, a) for any τ, so Q0 = 1 + γ Q1 and Q1 = γ Q0: Q0 = 1/(1 − γ²), Q1 = γ/(1 − γ²)."""
    gamma = 0.9
    s0, s1 = [1.0, 0.0], [0.0, 1.0]
    data = {"observations": jnp.array([s0, s1]), "next_observations": jnp.array([s1, s0]),
            "actions": jnp.array([[0.5], [-0.5]]), "rewards": jnp.array([1.0, 0.0]), "terminals": jnp.zeros(2)}
    agent = make_agent(2, 1, gamma=gamma, polyak=0.05, lr=3e-3, decay_over=6000)
    state, _ = train(agent, data, 6000)
    q = agent.critic.apply(state.critic_params, data["observations"], data["actions"])
    expected = [1 / (1 - gamma ** 2), gamma / (1 - gamma ** 2)]
    np.testing.assert_allclose(q, [expected, expected], rtol=0.02)


def test_awr_prefers_the_better_action():
    """One state, two actions; the actor's mean moves to the action with the higher reward."""
    data = {"observations": jnp.ones((2, 1)), "next_observations": jnp.ones((2, 1)),
            "actions": jnp.array([[-0.5], [0.5]]), "rewards": jnp.array([0.0, 1.0]), "terminals": jnp.ones(2)}
    agent = make_agent(1, 1, polyak=0.05, lr=3e-3)
    state, _ = train(agent, data, 2000)
    mean, _ = agent.actor.apply(state.actor_params, jnp.ones((1, 1)))
    assert float(mean[0, 0]) > 0.4


def _rows(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_iql_offline_and_online_smoke(tmp_path, hopper_tiny):
    summary = iql.main(iql.Args(dataset=hopper_tiny, total_steps=200, eval_every=100, online_steps=200,
                                num_seeds=2, eval_episodes=2, hidden=(32, 32), runs_dir=str(tmp_path),
                                checkpoint_every=100, critic_layernorm=True, seem_every=100))
    rows = _rows(summary["run"])
    assert rows[0]["seem_num_params"] == [q1_param_count(11 + 3, (32, 32), layernorm=True)] * 2  # Q1's alone
    assert [(r["step"], r["phase"]) for r in rows] == [(100, "offline"), (200, "offline"), (300, "online"),
                                                       (400, "online")]
    assert rows[-1]["env_steps"] == 200 and np.isfinite(summary["last_mean"])


def test_iql_online_resume_equals_uninterrupted(tmp_path, hopper_tiny, interrupt_after):
    def args(d, **kw):
        return iql.Args(dataset=hopper_tiny, total_steps=100, eval_every=100, online_steps=300, num_seeds=2,
                        eval_episodes=1, hidden=(16, 16), runs_dir=str(d), checkpoint_every=100, **kw)

    timing = ("updates_per_s", "steps_per_s", "compile_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    full = strip(_rows(iql.main(args(tmp_path / "full"))["run"]))
    interrupt_after(200)
    with pytest.raises(KeyboardInterrupt):
        iql.main(args(tmp_path / "cut"))
    (run_dir,) = (tmp_path / "cut").iterdir()
    resumed = strip(_rows(iql.main(iql.Args(resume=str(run_dir)))["run"]))
    assert [r["step"] for r in resumed] == [100, 200, 300, 400]
    assert full == resumed


def test_iql_family_defaults_and_bad_args(tmp_path, hopper_tiny):
    assert iql.FAMILIES["antmaze"][:2] == (0.9, 10.0) and iql.FAMILIES["kitchen"][2] == 0.1
    with pytest.raises(SystemExit, match="expectile"):
        iql.main(iql.Args(dataset=hopper_tiny, expectile=1.5, runs_dir=str(tmp_path)))
    with pytest.raises(SystemExit, match="--cosine-decay with --online-steps"):
        iql.main(iql.Args(dataset=hopper_tiny, cosine_decay=True, online_steps=5000, runs_dir=str(tmp_path)))
    with pytest.raises(common.DataError, match="asked for 5000 transitions"):
        iql.main(iql.Args(dataset=hopper_tiny, num_transitions=5000, total_steps=100, eval_every=100,
                          runs_dir=str(tmp_path)))
