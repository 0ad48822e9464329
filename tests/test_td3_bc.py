"""TD3+BC and the LayerNorm-TD variants: the actor loss and the critic target by hand, divergence as
a known behaviour (pure offline TD3 diverges and SEEM says so; LayerNorm prevents it), smoke runs
with SEEM."""

import dataclasses
import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import q1_param_count, random_batch

import common
from algorithms import td3_bc


def _agent(**kw):
    args = dataclasses.replace(td3_bc.Args(), hidden=(16, 16), **kw)
    import optax

    return td3_bc.Agent(actor=td3_bc.Actor(args.hidden, 2), critic=td3_bc.TwinCritic(args.hidden, args.critic_layernorm),
                        tx=optax.sgd(0.0), args=args)


def test_actor_loss_by_hand():
    """L_π = −λ mean Q1(s, π(s)) + c mean (π(s) − a)², λ = α / mean|Q1| without gradient; with a
    zero learning rate the reported loss is the loss at the current parameters."""
    agent = _agent(alpha=2.5, bc_alpha=0.7)
    state = td3_bc.create_state(jax.random.PRNGKey(0), agent, 3, 2)
    batch = {"observations": jax.random.normal(jax.random.PRNGKey(1), (8, 3)),
             "actions": jax.random.uniform(jax.random.PRNGKey(2), (8, 2), minval=-1, maxval=1)}
    _, m = td3_bc.actor_update(state, batch, agent)
    pi = np.asarray(agent.actor.apply(state.actor_params, batch["observations"]))
    q1 = np.asarray(agent.critic.apply(state.critic_params, batch["observations"], pi)[0])
    bc = np.mean((pi - np.asarray(batch["actions"])) ** 2)
    expected = -2.5 / np.abs(q1).mean() * q1.mean() + 0.7 * bc
    assert float(m["actor_loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(m["bc_loss"]) == pytest.approx(bc, rel=1e-5)


def test_critic_target_by_hand():
    """y = r + γ (1 − d) min_i Q_θ̄i(s', clip(π_φ̄(s') + clip(σ ε, −c, c), −1, 1)): the target actor and
    critics (made unlike the online ones, so that mixing them up shows), the noise clipped before the
    action, the smaller critic; L_Q sums the twins' MSEs."""
    agent = _agent(gamma=0.9, policy_noise=0.2, noise_clip=0.5)
    state = td3_bc.create_state(jax.random.PRNGKey(0), agent, 3, 2)
    state = state.replace(target_critic_params=jax.tree.map(lambda x: 0.5 * x + 0.1, state.target_critic_params),
                          target_actor_params=jax.tree.map(lambda x: 3.0 * x, state.target_actor_params))
    batch = random_batch()
    _, m = td3_bc.critic_update(state, batch, agent)
    _, k_noise = jax.random.split(state.key)
    eps = np.asarray(jax.random.normal(k_noise, (8, 2)), np.float64)
    mu = np.asarray(agent.actor.apply(state.target_actor_params, batch["next_observations"]), np.float64)
    next_a = np.clip(mu + np.clip(0.2 * eps, -0.5, 0.5), -1, 1)
    next_q = np.asarray(agent.critic.apply(state.target_critic_params, batch["next_observations"],
                                           next_a.astype(np.float32)), np.float64).min(0)
    y = batch["rewards"] + 0.9 * (1 - batch["terminals"]) * next_q
    q = np.asarray(agent.critic.apply(state.critic_params, batch["observations"], batch["actions"]), np.float64)
    assert float(m["critic_loss"]) == pytest.approx(np.sum(np.mean((q - y) ** 2, axis=1)), rel=1e-5)


def _rows(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_pure_offline_td3_diverges_and_layernorm_prevents_it(tmp_path, hopper_tiny):
    """Yue et al.'s setting (no BC term, hard target copies) on a small random-policy dataset: Q
    leaves any possible value (returns here are below 100) and SEEM turns positive, near its
    paper value 0.7-0.8; with LayerNorm in the critic, Q stays bounded and SEEM stays near 0."""
    def run(layernorm):
        args = td3_bc.Args(dataset=hopper_tiny, total_steps=2000, eval_every=1000, seem_every=1000, eval_episodes=1,
                           bc_alpha=0.0, tau=1.0, hidden=(64, 64), critic_layernorm=layernorm,
                           runs_dir=str(tmp_path / str(layernorm)))
        return _rows(td3_bc.main(args)["run"])[-1]

    plain, ln = run(False), run(True)
    assert plain["q_mean"][0] > 1e3 and plain["seem_normalized"][0] > 0.3, plain
    assert abs(ln["q_mean"][0]) < 200 and ln["seem_normalized"][0] < 0.05, ln


def test_td3_bc_offline_online_smoke(tmp_path, hopper_tiny):
    summary = td3_bc.main(td3_bc.Args(dataset=hopper_tiny, total_steps=200, eval_every=100, online_steps=200,
                                      num_seeds=2, eval_episodes=1, hidden=(16, 16), runs_dir=str(tmp_path),
                                      checkpoint_every=100, critic_layernorm=True, seem_every=100,
                                      data_fraction=0.5))
    rows = _rows(summary["run"])
    assert [(r["step"], r["phase"]) for r in rows] == [(100, "offline"), (200, "offline"), (300, "online"),
                                                       (400, "online")]
    assert len(rows[0]["seem"]) == 2 and "seem" not in rows[-1]
    assert rows[0]["seem_num_params"] == [q1_param_count(11 + 3, (16, 16), layernorm=True)] * 2  # Q1's alone
    assert np.isfinite(summary["last_mean"])


def test_td3_bc_rejects_bad_arguments(tmp_path, hopper_tiny):
    with pytest.raises(SystemExit, match="multiple of --policy-delay"):
        td3_bc.main(td3_bc.Args(dataset=hopper_tiny, eval_every=101, total_steps=101, checkpoint_every=101,
                                runs_dir=str(tmp_path)))
    with pytest.raises(SystemExit, match="--tau and --gamma"):
        td3_bc.main(td3_bc.Args(dataset=hopper_tiny, tau=0.0, runs_dir=str(tmp_path)))


def test_online_schedule_one_critic_update_per_step_actor_every_second():
    """TD3 online: each environment step updates the critic once; the actor (and both targets)
    only on every `policy_delay`-th step."""
    agent = td3_bc.make_agent(td3_bc.Args(hidden=(8, 8)), obs_dim=3, act_dim=2)
    rng = np.random.default_rng(0)
    rows = {"observations": rng.normal(size=(50, 3)), "actions": rng.uniform(-1, 1, (50, 2)),
            "rewards": rng.normal(size=50), "next_observations": rng.normal(size=(50, 3)), "terminals": np.zeros(50)}
    rows = {k: jnp.asarray(v, jnp.float32) for k, v in rows.items()}
    state = td3_bc.create_state(jax.random.PRNGKey(0), agent, 3, 2)
    state = state.replace(buffer=common.ReplayBuffer.create({k: v[0] for k, v in rows.items()}, 100, initial=rows))
    transition = {k: v[0] for k, v in rows.items()} | {"episode_ends": jnp.zeros(())}
    step = jax.jit(partial(td3_bc.online_step, agent=agent))

    def differs(a, b):
        return not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    changed = []
    for t in range(4):
        new, _, metrics = step(state, transition, rows["observations"][1], t, jnp.zeros(3), jnp.ones(3))
        changed.append((differs(new.critic_params, state.critic_params), differs(new.actor_params, state.actor_params),
                        differs(new.target_critic_params, state.target_critic_params)))
        assert np.isfinite(float(metrics["actor_loss"]))
        state = new
    assert changed == [(True, False, False), (True, True, True)] * 2
