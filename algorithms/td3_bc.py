"""TD3+BC (Fujimoto and Gu, NeurIPS 2021) and pure offline TD3, with or without a LayerNorm critic:
the LayerNorm-TD variants of Yue et al. (NeurIPS 2023, "Understanding, Predicting and Better
Resolving Q-Value Divergence in Offline RL").

TD3 with a behaviour-cloning term in the actor loss, on normalised states:

    ã'   = clip(π_φ̄(s') + clip(N(0, 0.2²), −0.5, 0.5), −1, 1)                  (target smoothing)
    y    = r + γ (1 − d) min_i Q_θ̄i(s', ã')
    L_Q  = Σ_i E (Q_θi(s, a) − y)²
    L_π  = −λ E[Q_θ1(s, π_φ(s))] + c · E[‖π_φ(s) − a‖² / |A|],
           λ = α / E|Q_θ1(s, π_φ(s))|  (no gradient)
    every 2nd critic update (same batch): actor step, then θ̄ ← τθ + (1 − τ)θ̄ and φ̄ ← τφ + (1 − τ)φ̄
    (d = 1 only at a true terminal state; time-limit truncations bootstrap)

Defaults are TD3+BC's (α = 2.5, c = 1, τ = 0.005, Adam 3e-4, batch 256, 256x256 networks); the
weights start from flax's default (LeCun-normal kernels, zero biases), not PyTorch's uniform one.
Yue et al. explain Q divergence in offline TD by SEEM, the largest real part of the eigenvalues of
the linearised TD dynamics (`common.seem`, logged with `--seem-every`, also divided by ‖A‖_F), and
cure it with LayerNorm in the critic (`--critic-layernorm`: Linear -> LayerNorm -> ReLU in each
hidden layer). Their divergence setting is pure offline TD3: `--bc-alpha 0 --tau 1.0` (no BC term, hard target copies). `--optimizer sgd`,
`--gamma`, `--data-fraction` and `--num-transitions` reproduce their other studies.
`--online-steps` continues TD3+BC online (exploration noise 0.1, buffer seeded with the dataset; one
critic update per environment step, the actor and targets every `--policy-delay`-th, as TD3).

Run: python -m algorithms.td3_bc --dataset offlax/walker2d/medium-expert-v0 --bc-alpha 0 --tau 1 --seem-every 10000
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Literal

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import common


@dataclasses.dataclass
class Args:
    # --- experiment ---
    dataset: str = "offlax/walker2d/medium-expert-v0"
    """Minari dataset id: local, remote (downloaded when online) or offlax/<env>/<quality>-v0 (built on first use)."""
    seed: int = 0
    """Seed of the first run; seed i of --num-seeds is seed + i."""
    num_seeds: int = 1
    """Independent seeds trained at once in one process (jax.vmap); equal to separate runs."""
    total_steps: int = 1_000_000
    """Offline critic updates per seed (the actor updates every --policy-delay of them)."""
    eval_every: int = 5_000
    """Updates (offline) or environment steps (online) between evaluations; one fused chunk offline."""
    eval_episodes: int = 10
    """Deterministic evaluation episodes per seed."""
    last_evals: int = 10
    """The reported 'last' score is the mean of this many final evaluations."""
    runs_dir: str = "runs"
    """Where run folders (config, metrics.jsonl, checkpoint, summary) are written."""
    resume: str | None = None
    """Continue the run in this folder from its last checkpoint (its saved config is used)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb`)."""
    seem_every: int = 0
    """Log SEEM (largest eigenvalue of the TD dynamics, on a fixed probe of 2,560 transitions) every this many
    updates; 0: never."""
    # --- algorithm ---
    alpha: float = 2.5
    """TD3+BC's α: the Q term's weight is λ = α / mean|Q|."""
    bc_alpha: float = 1.0
    """Weight c of the behaviour-cloning term; 0 gives pure offline TD3 (the divergence setting)."""
    gamma: float = 0.99
    """Discount factor γ."""
    tau: float = 0.005
    """Target update rate on actor-update steps; 1.0 copies the networks (hard target)."""
    policy_delay: int = 2
    """Critic updates per actor update."""
    policy_noise: float = 0.2
    """Std of the target policy smoothing noise."""
    noise_clip: float = 0.5
    """Clip of the target policy smoothing noise."""
    optimizer: Literal["adam", "sgd"] = "adam"
    """Optimiser of actor and critics."""
    lr: float = 3e-4
    """Learning rate of actor and critics."""
    batch_size: int = 256
    """Transitions per update."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden widths of actor and critics."""
    critic_layernorm: bool = False
    """Linear -> LayerNorm -> ReLU in every hidden layer of the critics (Yue et al. 2023)."""
    normalize_obs: bool = True
    """Standardise states with the dataset's mean and std (+1e-3), as TD3+BC."""
    data_fraction: float = 1.0
    """Train on this share of the dataset's transitions, drawn once at random (data-scarce study)."""
    num_transitions: int | None = None
    """Train on exactly this many transitions, drawn once at random (overrides --data-fraction)."""
    # --- online fine-tuning ---
    online_steps: int = 0
    """Environment steps of online TD3+BC after the offline phase (0: offline only)."""
    exploration_noise: float = 0.1
    """Online: std of the Gaussian noise added to the actor's actions."""
    checkpoint_every: int = 50_000
    """Online: environment steps between checkpoints (a multiple of --eval-every)."""


def check_args(args: Args) -> None:
    common.check_run_args(args, "policy_delay")
    if args.eval_every % args.policy_delay:
        raise SystemExit(f"--eval-every must be a multiple of --policy-delay ({args.policy_delay})")
    if not 0 < args.tau <= 1 or not 0 < args.gamma <= 1:
        raise SystemExit("--tau and --gamma must lie in (0, 1]")


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------

class MLP(nn.Module):
    hidden: tuple[int, ...]
    out: int
    layernorm: bool = False

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.Dense(width)(x)
            if self.layernorm:
                x = nn.LayerNorm(epsilon=1e-5)(x)  # PyTorch's default, as the authors' code
            x = nn.relu(x)
        return nn.Dense(self.out)(x)


class TwinCritic(nn.Module):
    hidden: tuple[int, ...]
    layernorm: bool = False

    @nn.compact
    def __call__(self, obs, action):
        twin = nn.vmap(MLP, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None,
                       out_axes=0, axis_size=2)
        return twin(self.hidden, 1, self.layernorm)(jnp.concatenate([obs, action], -1)).squeeze(-1)


class Actor(nn.Module):
    hidden: tuple[int, ...]
    action_dim: int

    @nn.compact
    def __call__(self, obs):
        return jnp.tanh(MLP(self.hidden, self.action_dim)(obs))


# ---------------------------------------------------------------------------------------------
# Train state and the update
# ---------------------------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
    actor_params: dict
    target_actor_params: dict
    critic_params: dict
    target_critic_params: dict
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    key: jax.Array
    buffer: common.ReplayBuffer | None = None  # the online phase's replay buffer


@dataclasses.dataclass(frozen=True)
class Agent:
    """Networks, optimiser and Args: the static parts, closed over by jit."""
    actor: Actor
    critic: TwinCritic
    tx: optax.GradientTransformation
    args: Args


def create_state(key, agent: Agent, obs_dim: int, act_dim: int) -> TrainState:
    key, k_actor, k_critic = jax.random.split(key, 3)
    obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim))
    actor_params, critic_params = agent.actor.init(k_actor, obs), agent.critic.init(k_critic, obs, act)
    copy = partial(jax.tree.map, jnp.copy)  # equal values, own buffers (donation)
    return TrainState(actor_params=actor_params, target_actor_params=copy(actor_params), critic_params=critic_params,
                      target_critic_params=copy(critic_params), actor_opt=agent.tx.init(actor_params),
                      critic_opt=agent.tx.init(critic_params), key=key)


def critic_update(state: TrainState, batch, agent: Agent):
    a = agent.args
    key, k_noise = jax.random.split(state.key)
    next_a = agent.actor.apply(state.target_actor_params, batch["next_observations"])
    noise = jnp.clip(a.policy_noise * jax.random.normal(k_noise, next_a.shape), -a.noise_clip, a.noise_clip)
    next_a = jnp.clip(next_a + noise, -1.0, 1.0)
    next_q = agent.critic.apply(state.target_critic_params, batch["next_observations"], next_a).min(0)
    y = batch["rewards"] + a.gamma * (1.0 - batch["terminals"]) * next_q

    def critic_loss(params):
        q = agent.critic.apply(params, batch["observations"], batch["actions"])
        return jnp.sum(jnp.mean((q - y) ** 2, axis=1)), q

    (loss, q), grads = jax.value_and_grad(critic_loss, has_aux=True)(state.critic_params)
    updates, opt = agent.tx.update(grads, state.critic_opt, state.critic_params)
    state = state.replace(critic_params=optax.apply_updates(state.critic_params, updates), critic_opt=opt, key=key)
    # ‖θ‖ beside |Q|: SEEM's theory predicts how both grow once the critic self-excites
    return state, {"critic_loss": loss, "q_mean": q.mean(), "q_abs_max": jnp.abs(q).max(),
                   "critic_param_norm": optax.tree.norm(state.critic_params)}


def actor_loss(actor_params, critic_params, batch, agent: Agent):
    """−λ·mean Q_θ1(s, π_φ(s)) + c·mean (π_φ(s) − a)² (over batch and action dimensions, as the authors'
    F.mse_loss), λ = α / mean|Q_θ1| (no gradient through λ); returns (loss, BC term)."""
    a = agent.args
    pi = agent.actor.apply(actor_params, batch["observations"])
    q = agent.critic.apply(critic_params, batch["observations"], pi)[0]
    lam = a.alpha / jax.lax.stop_gradient(jnp.abs(q).mean())
    bc = jnp.mean((pi - batch["actions"]) ** 2)
    return -lam * q.mean() + a.bc_alpha * bc, bc


def actor_update(state: TrainState, batch, agent: Agent):
    """The TD3+BC actor step, then both target networks move by τ."""
    a = agent.args
    (loss, bc), grads = jax.value_and_grad(actor_loss, has_aux=True)(state.actor_params, state.critic_params,
                                                                      batch, agent)
    updates, opt = agent.tx.update(grads, state.actor_opt, state.actor_params)
    actor_params = optax.apply_updates(state.actor_params, updates)
    state = state.replace(
        actor_params=actor_params, actor_opt=opt,
        target_actor_params=optax.incremental_update(actor_params, state.target_actor_params, a.tau),
        target_critic_params=optax.incremental_update(state.critic_params, state.target_critic_params, a.tau))
    return state, {"actor_loss": loss, "bc_loss": bc}


def update_group(state: TrainState, sample: callable, agent: Agent):
    """`policy_delay` critic updates, the last followed by the actor and target updates; metrics
    of each critic update (shape (policy_delay,)), the actor's repeated alongside."""
    metrics = []
    for i in range(agent.args.policy_delay):
        key, k_batch = jax.random.split(state.key)
        batch = sample(k_batch)
        state, m = critic_update(state.replace(key=key), batch, agent)
        metrics.append(m)
    state, m_actor = actor_update(state, batch, agent)
    metrics = jax.tree.map(lambda *x: jnp.stack(x), *metrics)
    return state, dict(metrics, **jax.tree.map(lambda x: jnp.full((agent.args.policy_delay,), x), m_actor))


def train_chunk(state: TrainState, data, agent: Agent, num_updates: int):
    """`num_updates` critic updates (and every `policy_delay`-th an actor update) in one lax.scan."""
    sample = partial(common.sample_batch, data=data, batch_size=agent.args.batch_size)
    state, metrics = jax.lax.scan(lambda s, _: update_group(s, lambda k: sample(k), agent), state, None,
                                  length=num_updates // agent.args.policy_delay)
    return state, jax.tree.map(lambda x: x.reshape(-1), metrics)


# ---------------------------------------------------------------------------------------------
# Online phase: TD3+BC continues with exploration noise; the buffer starts with the dataset
# ---------------------------------------------------------------------------------------------

def explore(agent: Agent, actor_params, obs, key):
    action = agent.actor.apply(actor_params, obs)
    return jnp.clip(action + agent.args.exploration_noise * jax.random.normal(key, action.shape), -1.0, 1.0)


def online_step(state: TrainState, transition, next_obs, t, obs_mean, obs_std, agent: Agent):
    """Store the transition (states normalised as the dataset's), one critic update, and on every
    `policy_delay`-th step the actor and target updates (TD3's online schedule: one critic update per
    environment step); act at s' with exploration noise."""
    norm = lambda o: (o - obs_mean) / obs_std  # noqa: E731
    row = {k: transition[k] for k in common.TRANSITION_KEYS}
    row["observations"], row["next_observations"] = norm(row["observations"]), norm(row["next_observations"])
    state = state.replace(buffer=state.buffer.add(jax.tree.map(lambda x: x[None], row)))
    key, k_batch, k_act = jax.random.split(state.key, 3)
    batch = state.buffer.sample(k_batch, agent.args.batch_size)
    state, metrics = critic_update(state.replace(key=key), batch, agent)

    def skip_actor(state):  # the current actor's losses, so that every logged value is a real one
        loss, bc = actor_loss(state.actor_params, state.critic_params, batch, agent)
        return state, {"actor_loss": loss, "bc_loss": bc}

    # t is shared by all seeds (not vmapped), so this stays a real branch under vmap
    state, m_actor = jax.lax.cond((t + 1) % agent.args.policy_delay == 0, lambda s: actor_update(s, batch, agent),
                                  skip_actor, state)
    return state, explore(agent, state.actor_params, norm(next_obs), k_act), dict(metrics, **m_actor)


def first_action(state: TrainState, obs, obs_mean, obs_std, agent: Agent):
    key, k_act = jax.random.split(state.key)
    return state.replace(key=key), explore(agent, state.actor_params, (obs - obs_mean) / obs_std, k_act)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def make_agent(args: Args, obs_dim: int, act_dim: int) -> Agent:
    tx = optax.adam(args.lr) if args.optimizer == "adam" else optax.sgd(args.lr)
    return Agent(actor=Actor(args.hidden, act_dim), critic=TwinCritic(args.hidden, args.critic_layernorm), tx=tx,
                 args=args)


def main(args: Args) -> dict:
    args = common.resume_args(args)
    check_args(args)
    dataset = common.load_dataset(args.dataset)
    dataset, _ = common.subsample(dataset, args.data_fraction, args.num_transitions)
    obs_dim, act_dim = dataset.observations.shape[1], dataset.actions.shape[1]
    if args.normalize_obs:
        obs_mean, obs_std = common.obs_stats(dataset)
    else:
        obs_mean, obs_std = np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32)
    data = common.device_arrays(dataset, obs_mean, obs_std)

    agent = make_agent(args, obs_dim, act_dim)
    state = jax.vmap(lambda k: create_state(k, agent, obs_dim, act_dim))(common.seed_keys(args.seed, args.num_seeds))

    def with_buffer(state):
        buffer = common.ReplayBuffer.create({k: data[k][0] for k in common.TRANSITION_KEYS},
                                            len(dataset) + args.online_steps,
                                            initial={k: data[k] for k in common.TRANSITION_KEYS})
        return state.replace(buffer=common.stack_seeds(buffer, args.num_seeds))

    run = common.Run("td3_bc", args, args.total_steps + args.online_steps,
                     (dataset.ref_min_score, dataset.ref_max_score))
    if run.checkpoint_step() > args.total_steps:  # an online checkpoint holds the buffer: the template needs one
        state = with_buffer(state)
    state, start = run.restore(state)

    mean, std = jnp.asarray(obs_mean), jnp.asarray(obs_std)
    evaluator = common.Evaluator(dataset.make_env, run.seeds, args.eval_episodes,
                                 policy=lambda params, obs: agent.actor.apply(params, (obs - mean) / std))
    q1 = MLP(args.hidden, 1, args.critic_layernorm)  # SEEM of Q_θ1 alone, as the authors' code

    def q1_params(critic):  # SEEM's P counts the parameters given: Q1's alone (seeds on axis 0, twins on 1)
        return {"params": jax.tree.map(lambda x: x[:, 0], critic["params"]["VmapMLP_0"])}

    seem = common.SeemMonitor(args.seem_every, data, lambda p, s, a: q1.apply(p, jnp.concatenate([s, a], -1))[:, 0],
                              args.gamma)
    act = jax.jit(agent.actor.apply)

    def evaluate(state, step):
        returns = evaluator(state.actor_params, step)
        extra = seem(step, q1_params(state.critic_params),
                     lambda i, s: act(common.tree_index(state.actor_params, i), s)) if step <= args.total_steps else {}
        return returns, extra

    chunk = jax.jit(jax.vmap(partial(train_chunk, agent=agent, num_updates=args.eval_every), in_axes=(0, None)),
                    donate_argnums=0)
    state = common.train_offline(run, state, chunk, data, evaluate, start=start, total=args.total_steps,
                                 eval_every=args.eval_every)
    if args.online_steps:
        if state.buffer is None:
            state = with_buffer(state)
        step_fn = jax.jit(jax.vmap(partial(online_step, agent=agent), in_axes=(0, 0, 0, None, None, None)),
                          donate_argnums=0)
        first = jax.jit(jax.vmap(partial(first_action, obs_mean=mean, obs_std=std, agent=agent)))
        common.train_online(run, state, common.vector_env(dataset.make_env, args.num_seeds), step_fn, first,
                            lambda s, step: evaluate(s, step)[0], start=max(start, args.total_steps),
                            total=args.total_steps + args.online_steps, eval_every=args.eval_every,
                            checkpoint_every=args.checkpoint_every, env_offset=args.total_steps,
                            step_args=(mean, std))
    return run.finish()


if __name__ == "__main__":
    common.cli(main, Args)
