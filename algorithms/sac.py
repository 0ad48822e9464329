"""Soft Actor-Critic (Haarnoja et al. 2018, "SAC: Algorithms and Applications"), online.

SAC maximises return plus policy entropy. A tanh-squashed Gaussian actor π_φ, twin critics
Q_θ1, Q_θ2 with Polyak-averaged targets Q_θ̄i, and a temperature α tuned to a target entropy H̄:

    y        = r + γ (1 − d) ( min_i Q_θ̄i(s', ã') − α log π_φ(ã'|s') ),   ã' ~ π_φ(·|s')
    L_Q(θ)   = Σ_i E[(Q_θi(s, a) − y)²]
    L_π(φ)   = E_s[ α log π_φ(ã|s) − min_i Q_θi(s, ã) ],   ã = tanh(μ_φ(s) + σ_φ(s)·ε),  ε ~ N(0, I)
    L_α      = E_s[ −α (log π_φ(ã|s) + H̄) ],   H̄ = −|A|
    θ̄ ← τ θ + (1 − τ) θ̄ after every update;  d = 1 only at a true terminal state (truncations bootstrap)

Defaults are the usual MuJoCo ones (256x256 networks, Adam 3e-4, batch 256, γ 0.99, τ 0.005,
one update per environment step after 10,000 uniformly random warm-up steps). This script also
trains the behaviour policies of the offlax datasets: `--snapshot-every` saves the actor of every
seed during training in the format `benchmarks/offlax_suite.policy_actions` reads.

Run: python -m algorithms.sac --env-id Hopper-v5 --total-steps 1000000 --snapshot-every 25000
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import flax
import flax.linen as nn
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax

import common

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


@dataclasses.dataclass
class Args:
    # --- experiment ---
    env_id: str = "Hopper-v5"
    """Gymnasium environment id."""
    seed: int = 0
    """Seed of the first run; seed i of --num-seeds is seed + i."""
    num_seeds: int = 1
    """Independent seeds trained at once (one environment each, jax.vmap over the agents)."""
    total_steps: int = 1_000_000
    """Environment steps per seed (one update per step after the warm-up)."""
    eval_every: int = 10_000
    """Environment steps between evaluations."""
    eval_episodes: int = 10
    """Deterministic evaluation episodes per seed."""
    last_evals: int = 10
    """The reported 'last' score is the mean of this many final evaluations."""
    checkpoint_every: int = 100_000
    """Environment steps between checkpoints (a multiple of --eval-every); also saved at the end."""
    snapshot_every: int = 0
    """Save every seed's actor every this many steps (0: never) to <run>/policies/."""
    runs_dir: str = "runs"
    """Where run folders are written."""
    resume: str | None = None
    """Continue the run in this folder from its last checkpoint (its saved config is used)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb`)."""
    seem_every: int = 0
    """Log SEEM (largest eigenvalue of the TD dynamics) every this many steps, on a fixed probe of 2,560
    transitions drawn once from the first seed's replay buffer; 0: never."""
    # --- algorithm ---
    learning_starts: int = 10_000
    """Warm-up steps with uniformly random actions before the first update."""
    buffer_size: int = 1_000_000
    """Replay buffer capacity per seed."""
    batch_size: int = 256
    """Transitions per update."""
    gamma: float = 0.99
    """Discount factor γ."""
    tau: float = 0.005
    """Polyak rate of the target critics."""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor."""
    critic_lr: float = 3e-4
    """Adam learning rate of the critics."""
    alpha_lr: float = 3e-4
    """Adam learning rate of log α."""
    init_alpha: float = 1.0
    """Initial temperature α."""
    target_entropy: float | None = None
    """Target entropy H̄ (default −|A|)."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden widths of actor and critics."""


def check_args(args: Args) -> None:
    common.check_run_args(args, "buffer_size")
    if args.learning_starts < 1:
        raise SystemExit("--learning-starts must be at least 1 (the first action is always a uniform warm-up action)")
    if not 0 < args.gamma <= 1 or not 0 < args.tau <= 1:
        raise SystemExit("--gamma and --tau must lie in (0, 1]")


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------

class Actor(nn.Module):
    """s -> (mean, log_std) of the Gaussian before the tanh squashing."""

    hidden: tuple[int, ...]
    action_dim: int

    @nn.compact
    def __call__(self, obs):
        x = obs
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        mean, log_std = jnp.split(nn.Dense(2 * self.action_dim)(x), 2, axis=-1)
        return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


class Critic(nn.Module):
    hidden: tuple[int, ...]

    @nn.compact
    def __call__(self, obs, action):
        x = jnp.concatenate([obs, action], axis=-1)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(1)(x).squeeze(-1)


class TwinCritic(nn.Module):
    """Two independent critics evaluated in one call: output shape (2, batch)."""

    hidden: tuple[int, ...]

    @nn.compact
    def __call__(self, obs, action):
        twin = nn.vmap(Critic, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=None, out_axes=0, axis_size=2)
        return twin(self.hidden)(obs, action)


def sample_action(actor: Actor, params, obs, key):
    """ã = tanh(μ + σ ε) and log π(ã|s), with the tanh change of variables:
    log π(ã|s) = Σ_j [ log N(u_j; μ_j, σ_j) − log(1 − tanh(u_j)²) ]."""
    mean, log_std = actor.apply(params, obs)
    eps = jax.random.normal(key, mean.shape)
    u = mean + jnp.exp(log_std) * eps
    log_normal = -0.5 * eps ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
    log_det = 2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u))  # log(1 − tanh(u)²), stable
    return jnp.tanh(u), jnp.sum(log_normal - log_det, axis=-1)


# ---------------------------------------------------------------------------------------------
# Train state and the update
# ---------------------------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
    actor_params: dict
    critic_params: dict
    target_critic_params: dict
    log_alpha: jax.Array
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    alpha_opt: optax.OptState
    buffer: common.ReplayBuffer
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class Agent:
    """The static parts: networks, optimisers, hyper-parameters (closed over by jit)."""

    actor: Actor
    critic: TwinCritic
    actor_tx: optax.GradientTransformation
    critic_tx: optax.GradientTransformation
    alpha_tx: optax.GradientTransformation
    gamma: float
    tau: float
    target_entropy: float
    batch_size: int


def create_state(key, agent: Agent, obs_dim: int, act_dim: int, args: Args) -> TrainState:
    key, k_actor, k_critic = jax.random.split(key, 3)
    obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim))
    actor_params = agent.actor.init(k_actor, obs)
    critic_params = agent.critic.init(k_critic, obs, act)
    log_alpha = jnp.asarray(np.log(args.init_alpha), jnp.float32)
    example = {"observations": obs[0], "actions": act[0], "rewards": jnp.zeros(()),
               "next_observations": obs[0], "terminals": jnp.zeros(())}
    target_critic_params = jax.tree.map(jnp.copy, critic_params)  # equal values, own buffers (donation)
    return TrainState(
        actor_params=actor_params, critic_params=critic_params, target_critic_params=target_critic_params,
        log_alpha=log_alpha, actor_opt=agent.actor_tx.init(actor_params),
        critic_opt=agent.critic_tx.init(critic_params), alpha_opt=agent.alpha_tx.init(log_alpha),
        buffer=common.ReplayBuffer.create(example, min(args.buffer_size, args.total_steps)), key=key)


def update(state: TrainState, batch, agent: Agent):
    """One SAC update: critics, then actor (against the new critics), then α, then the targets."""
    key, k_next, k_pi = jax.random.split(state.key, 3)
    alpha = jnp.exp(state.log_alpha)

    next_a, next_logp = sample_action(agent.actor, state.actor_params, batch["next_observations"], k_next)
    next_q = agent.critic.apply(state.target_critic_params, batch["next_observations"], next_a).min(0)
    y = batch["rewards"] + agent.gamma * (1.0 - batch["terminals"]) * (next_q - alpha * next_logp)

    def critic_loss(params):
        q = agent.critic.apply(params, batch["observations"], batch["actions"])
        return jnp.sum(jnp.mean((q - y) ** 2, axis=1)), q

    (q_loss, q), grads = jax.value_and_grad(critic_loss, has_aux=True)(state.critic_params)
    updates, critic_opt = agent.critic_tx.update(grads, state.critic_opt, state.critic_params)
    critic_params = optax.apply_updates(state.critic_params, updates)

    def actor_loss(params):
        a, logp = sample_action(agent.actor, params, batch["observations"], k_pi)
        q_pi = agent.critic.apply(critic_params, batch["observations"], a).min(0)
        return jnp.mean(alpha * logp - q_pi), logp

    (pi_loss, logp), grads = jax.value_and_grad(actor_loss, has_aux=True)(state.actor_params)
    updates, actor_opt = agent.actor_tx.update(grads, state.actor_opt, state.actor_params)
    actor_params = optax.apply_updates(state.actor_params, updates)

    def alpha_loss(log_alpha):
        return -jnp.mean(jnp.exp(log_alpha) * jax.lax.stop_gradient(logp + agent.target_entropy))

    a_loss, grad = jax.value_and_grad(alpha_loss)(state.log_alpha)
    updates, alpha_opt = agent.alpha_tx.update(grad, state.alpha_opt, state.log_alpha)
    log_alpha = optax.apply_updates(state.log_alpha, updates)

    target = optax.incremental_update(critic_params, state.target_critic_params, agent.tau)
    state = state.replace(actor_params=actor_params, critic_params=critic_params, target_critic_params=target,
                          log_alpha=log_alpha, actor_opt=actor_opt, critic_opt=critic_opt, alpha_opt=alpha_opt,
                          key=key)
    metrics = {"critic_loss": q_loss, "actor_loss": pi_loss, "alpha_loss": a_loss, "alpha": alpha,
               "q_mean": q.mean(), "entropy": -logp.mean()}
    return state, metrics


def env_step(state: TrainState, transition, next_obs, t, agent: Agent, learning_starts: int):
    """What follows one environment step, for one seed: store the transition, update (from step
    `learning_starts` on), and choose the next action (uniform during the warm-up, then ã ~ π(·|s'))."""
    state = state.replace(buffer=state.buffer.add(jax.tree.map(lambda x: x[None], transition)))

    def train(state):
        key, k_batch = jax.random.split(state.key)
        return update(state.replace(key=key), state.buffer.sample(k_batch, agent.batch_size), agent)

    def skip(state):
        return state, jax.tree.map(jnp.zeros_like, jax.eval_shape(train, state)[1])

    state, metrics = jax.lax.cond(t >= learning_starts, train, skip, state)
    key, k_uniform, k_pi = jax.random.split(state.key, 3)
    uniform = jax.random.uniform(k_uniform, (agent.actor.action_dim,), minval=-1.0, maxval=1.0)
    policy, _ = sample_action(agent.actor, state.actor_params, next_obs[None], k_pi)
    action = jnp.where(t + 1 < learning_starts, uniform, policy[0])
    return state.replace(key=key), action, metrics


def first_action(state: TrainState, obs, agent: Agent):
    """The warm-up's first, uniformly random action."""
    key, k = jax.random.split(state.key)
    return state.replace(key=key), jax.random.uniform(k, (agent.actor.action_dim,), minval=-1.0, maxval=1.0)


def export_policy(params, path: Path, hidden: tuple[int, ...], action_dim: int) -> None:
    """Saves one seed's actor as plain float32 arrays in benchmarks/offlax_suite.policy_actions' format."""
    p = params["params"]
    arrays = {"num_hidden": np.asarray(len(hidden)), "log_std_min": np.float32(LOG_STD_MIN),
              "log_std_max": np.float32(LOG_STD_MAX)}
    for i in range(len(hidden)):
        arrays[f"hidden_{i}_w"] = np.asarray(p[f"Dense_{i}"]["kernel"], np.float32)
        arrays[f"hidden_{i}_b"] = np.asarray(p[f"Dense_{i}"]["bias"], np.float32)
    out = p[f"Dense_{len(hidden)}"]
    w, b = np.asarray(out["kernel"], np.float32), np.asarray(out["bias"], np.float32)
    arrays.update(mean_w=w[:, :action_dim], mean_b=b[:action_dim], log_std_w=w[:, action_dim:],
                  log_std_b=b[action_dim:])
    path.parent.mkdir(parents=True, exist_ok=True)
    common._atomic_savez(path, **arrays)


# ---------------------------------------------------------------------------------------------
# Main: the online loop (environments stepped in Python, everything else jitted)
# ---------------------------------------------------------------------------------------------

def make_agent(args: Args, obs_dim: int, act_dim: int) -> Agent:
    return Agent(actor=Actor(args.hidden, act_dim), critic=TwinCritic(args.hidden),
                 actor_tx=optax.adam(args.actor_lr), critic_tx=optax.adam(args.critic_lr),
                 alpha_tx=optax.adam(args.alpha_lr), gamma=args.gamma, tau=args.tau,
                 target_entropy=-float(act_dim) if args.target_entropy is None else args.target_entropy,
                 batch_size=args.batch_size)


def main(args: Args) -> dict:
    args = common.resume_args(args)
    check_args(args)
    make_env = partial(gym.make, args.env_id)
    envs = common.vector_env(make_env, args.num_seeds)
    obs_dim = envs.single_observation_space.shape[0]
    act_dim = envs.single_action_space.shape[0]

    agent = make_agent(args, obs_dim, act_dim)
    keys = common.seed_keys(args.seed, args.num_seeds)
    state = jax.vmap(lambda k: create_state(k, agent, obs_dim, act_dim, args))(keys)

    run = common.Run("sac", args, args.total_steps, common.env_reference_scores(args.env_id))
    state, start = run.restore(state)

    def snapshot(step, state):
        if args.snapshot_every and step % args.snapshot_every == 0:
            for i, seed in enumerate(run.seeds):
                export_policy(common.tree_index(state.actor_params, i),
                              run.dir / "policies" / f"step_{step:07d}_seed{seed}.npz", args.hidden, act_dim)

    evaluator = common.Evaluator(make_env, run.seeds, args.eval_episodes,
                                 policy=lambda params, obs: jnp.tanh(agent.actor.apply(params, obs)[0]))
    q1 = Critic(args.hidden)  # SEEM of Q_θ1 alone

    def q1_params(critic):  # SEEM's P counts the parameters given: Q1's alone (seeds on axis 0, twins on 1)
        return {"params": jax.tree.map(lambda x: x[:, 0], critic["params"]["VmapCritic_0"])}

    seem = common.SeemMonitor(args.seem_every, None, lambda p, s, a: q1.apply(p, s, a), args.gamma)
    mean_action = jax.jit(lambda params, obs: jnp.tanh(agent.actor.apply(params, obs)[0]))

    def evaluate(state, step):
        def first_seed_buffer():
            size = int(state.buffer.size[0])
            return {k: np.asarray(v[0, :size]) for k, v in state.buffer.data.items()}

        return evaluator(state.actor_params, step), seem(
            step, q1_params(state.critic_params), lambda i, s: mean_action(common.tree_index(state.actor_params, i), s),
            first_seed_buffer)

    step_fn = jax.jit(jax.vmap(partial(env_step, agent=agent, learning_starts=args.learning_starts),
                               in_axes=(0, 0, 0, None)), donate_argnums=0)
    state = common.train_online(
        run, state, envs, step_fn, jax.jit(jax.vmap(partial(first_action, agent=agent))),
        evaluate, start=start, total=args.total_steps,
        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
        learning_starts=args.learning_starts, on_eval=snapshot)
    return run.finish()


if __name__ == "__main__":
    common.cli(main, Args)
