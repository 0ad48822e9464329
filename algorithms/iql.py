"""Implicit Q-Learning (IQL; Kostrikov, Nair and Levine, ICLR 2022), offline and online fine-tuning.

IQL never queries Q at actions outside the dataset. It fits V to an upper expectile of the target
critics' values over the data's actions, backs Q up through V, and extracts the policy by
advantage-weighted regression:

    L_V(ψ)  = E_{(s,a)~D} L₂^τ( min_i Q_θ̄i(s,a) − V_ψ(s) ),     L₂^τ(u) = |τ − 1(u < 0)| u²
    L_Q(θ)  = Σ_i E_{(s,a,r,s')~D} ( r + γ (1 − d) V_ψ(s') − Q_θi(s,a) )²
    L_π(φ)  = −E_{(s,a)~D} [ min(exp(β (min_i Q_θ̄i(s,a) − V_ψ(s))), 100) · log π_φ(a|s) ]
    θ̄ ← τ_p θ + (1 − τ_p) θ̄,  τ_p = 0.005;  d = 1 only at a true terminal state (truncations bootstrap)

One update runs, in order: V (against the target critics), the actor (target critics and the new
V), Q (with the new V), the Polyak step: exactly the authors' `learner.py`. The actor is the
authors' Gaussian with a tanh'ed mean and a state-independent log-std clipped to [−5, 2] (not a
tanh-squashed distribution); every layer is orthogonally initialised with gain √2.

Defaults reproduce the paper's MuJoCo locomotion setting (τ = 0.7, β = 3, rewards scaled by
1000 / (max − min episode return), 1M updates, actor learning rate cosine-decayed to 0); `--family`
selects the AntMaze (τ = 0.9, β = 10, r − 1) and Kitchen/Adroit (τ = 0.7, β = 0.5, actor dropout
0.1) settings (for AntMaze the authors evaluate 100 episodes every 100k updates:
`--eval-episodes 100 --eval-every 100000`). `--online-steps N` fine-tunes online afterwards as in the authors'
`train_finetune.py`: the replay buffer starts with the whole dataset, one stochastic environment
step and one update per step, constant learning rates, time limits not terminal.

Run: python -m algorithms.iql --dataset offlax/hopper/medium-replay-v0 --num-seeds 3
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

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0

# (expectile τ, inverse temperature β, actor dropout, reward transform) per task family.
FAMILIES = {
    "locomotion": (0.7, 3.0, None, "normalize"),
    "antmaze": (0.9, 10.0, None, "minus_one"),
    "kitchen": (0.7, 0.5, 0.1, "none"),
    "adroit": (0.7, 0.5, 0.1, "none"),
}


@dataclasses.dataclass
class Args:
    # --- experiment ---
    dataset: str = "offlax/hopper/medium-replay-v0"
    """Minari dataset id: local, remote (downloaded when online) or offlax/<env>/<quality>-v0 (built on first use)."""
    seed: int = 0
    """Seed of the first run; seed i of --num-seeds is seed + i."""
    num_seeds: int = 1
    """Independent seeds trained at once in one process (jax.vmap); equal to separate runs."""
    total_steps: int = 1_000_000
    """Offline gradient updates per seed."""
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
    """Log SEEM of Q_θ1 (on a fixed probe of 2,560 transitions) every this many offline updates; 0: never.
    X* = (s', mean action of the actor), Yue et al.'s definition; IQL's Q bootstraps through V(s') instead,
    so here SEEM describes the Q-learning dynamics the critic would have, not IQL's exact ones."""
    # --- algorithm ---
    family: Literal["locomotion", "antmaze", "kitchen", "adroit"] = "locomotion"
    """Task family: sets the expectile, temperature, dropout and reward transform of the paper."""
    expectile: float | None = None
    """Expectile τ of the value loss (default: the family's)."""
    temperature: float | None = None
    """Inverse temperature β of the advantage weights (default: the family's)."""
    dropout: float | None = None
    """Dropout rate in the actor's hidden layers (default: the family's; 0 disables)."""
    gamma: float = 0.99
    """Discount factor γ."""
    polyak: float = 0.005
    """Polyak rate of the target critics."""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor."""
    critic_lr: float = 3e-4
    """Adam learning rate of the two Q networks."""
    value_lr: float = 3e-4
    """Adam learning rate of V."""
    cosine_decay: bool | None = None
    """Cosine-decay the actor learning rate to 0 over --total-steps (default: on offline-only, off when
    fine-tuning, as the authors' configs; refused with --online-steps, where the rate would stay 0 online)."""
    batch_size: int = 256
    """Transitions per update, sampled uniformly on the device."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden widths of all networks."""
    critic_layernorm: bool = False
    """Linear -> LayerNorm -> ReLU in every hidden layer of Q and V (Yue et al. 2023)."""
    data_fraction: float = 1.0
    """Train on this share of the dataset's transitions, drawn once at random (data-scarce study)."""
    num_transitions: int | None = None
    """Train on exactly this many transitions, drawn once at random (overrides --data-fraction)."""
    # --- online fine-tuning ---
    online_steps: int = 0
    """Environment steps of online fine-tuning after the offline phase (0: offline only)."""
    checkpoint_every: int = 50_000
    """Online: environment steps between checkpoints (a multiple of --eval-every)."""


def check_args(args: Args) -> None:
    common.check_run_args(args)
    tau = FAMILIES[args.family][0] if args.expectile is None else args.expectile
    if not 0 < tau < 1:
        raise SystemExit(f"--expectile must lie in (0, 1), got {tau}")
    if not 0 < args.gamma <= 1 or args.online_steps < 0:
        raise SystemExit("--gamma must lie in (0, 1] and --online-steps must be >= 0")
    if args.cosine_decay and args.online_steps > 0:
        raise SystemExit("--cosine-decay with --online-steps would hold the actor's learning rate at 0 through "
                         "the whole online phase (it decays to 0 over --total-steps); drop it to fine-tune, "
                         "as the authors do")


# ---------------------------------------------------------------------------------------------
# Data: rewards rescaled by the spread of episode returns (locomotion)
# ---------------------------------------------------------------------------------------------

def locomotion_reward_scale(dataset: common.Dataset) -> float:
    """IQL's locomotion scaling factor: 1000 / (max - min episode return)."""
    returns = dataset.episode_returns()
    if returns.max() - returns.min() <= 0:
        raise common.DataError(f"{dataset.id}: every episode has the same return ({returns.max():g}), so IQL's "
                               f"locomotion scaling 1000 / (max - min) is undefined; pick the --family whose reward "
                               f"transform suits the data (antmaze: r - 1; kitchen/adroit: unchanged)")
    return 1000.0 / (returns.max() - returns.min())


# ---------------------------------------------------------------------------------------------
# Networks (orthogonal init, gain √2, on every layer, as the authors' code)
# ---------------------------------------------------------------------------------------------

def dense(features: int) -> nn.Dense:
    return nn.Dense(features, kernel_init=nn.initializers.orthogonal(np.sqrt(2.0)))


class MLP(nn.Module):
    hidden: tuple[int, ...]
    layernorm: bool = False
    dropout: float = 0.0
    activate_final: bool = False

    @nn.compact
    def __call__(self, x, training: bool = False):
        for i, width in enumerate(self.hidden):
            x = dense(width)(x)
            if i + 1 < len(self.hidden) or self.activate_final:
                if self.layernorm:  # flax's ε = 1e-6 (td3_bc.py takes PyTorch's 1e-5, as its authors' code)
                    x = nn.LayerNorm()(x)
                x = nn.relu(x)
                if self.dropout > 0:
                    x = nn.Dropout(self.dropout)(x, deterministic=not training)
        return x


class TwinCritic(nn.Module):
    """Q_θ1(s, a), Q_θ2(s, a): two independent MLPs, output shape (2, batch)."""

    hidden: tuple[int, ...]
    layernorm: bool = False

    @nn.compact
    def __call__(self, obs, action):
        twin = nn.vmap(MLP, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None,
                       out_axes=0, axis_size=2)
        return twin(self.hidden + (1,), self.layernorm)(jnp.concatenate([obs, action], -1)).squeeze(-1)


class ValueCritic(nn.Module):
    hidden: tuple[int, ...]
    layernorm: bool = False

    @nn.compact
    def __call__(self, obs):
        return MLP(self.hidden + (1,), self.layernorm)(obs).squeeze(-1)


class Actor(nn.Module):
    """π(a|s) = N(tanh(μ(s)), exp(log_std)²): tanh'ed mean, state-independent log-std."""

    hidden: tuple[int, ...]
    action_dim: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, obs, training: bool = False):
        h = MLP(self.hidden, dropout=self.dropout, activate_final=True)(obs, training)
        mean = jnp.tanh(dense(self.action_dim)(h))
        log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))
        return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


def gaussian_log_prob(mean, log_std, action):
    """log N(a; μ, diag σ²) = Σ_j [ −(a_j − μ_j)² / (2σ_j²) − log σ_j − ½ log 2π ]."""
    return jnp.sum(-0.5 * ((action - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi), -1)


def expectile_loss(u, expectile: float):
    """L₂^τ(u) = |τ − 1(u < 0)| · u², elementwise."""
    return jnp.where(u > 0, expectile, 1.0 - expectile) * u ** 2


# ---------------------------------------------------------------------------------------------
# Train state and the update
# ---------------------------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
    actor_params: dict
    critic_params: dict
    target_critic_params: dict
    value_params: dict
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    value_opt: optax.OptState
    key: jax.Array
    buffer: common.ReplayBuffer | None = None  # the online phase's replay buffer


@dataclasses.dataclass(frozen=True)
class Agent:
    """Networks, optimisers and hyper-parameters: the static parts, closed over by jit."""

    actor: Actor
    critic: TwinCritic
    value: ValueCritic
    actor_tx: optax.GradientTransformation
    critic_tx: optax.GradientTransformation
    value_tx: optax.GradientTransformation
    expectile: float
    temperature: float
    gamma: float
    polyak: float
    batch_size: int


def create_state(key, agent: Agent, obs_dim: int, act_dim: int) -> TrainState:
    key, k_actor, k_critic, k_value = jax.random.split(key, 4)
    obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim))
    actor_params = agent.actor.init(k_actor, obs)
    critic_params = agent.critic.init(k_critic, obs, act)
    value_params = agent.value.init(k_value, obs)
    target_critic_params = jax.tree.map(jnp.copy, critic_params)  # equal values, own buffers (donation)
    return TrainState(actor_params=actor_params, critic_params=critic_params, target_critic_params=target_critic_params,
                      value_params=value_params, actor_opt=agent.actor_tx.init(actor_params),
                      critic_opt=agent.critic_tx.init(critic_params), value_opt=agent.value_tx.init(value_params),
                      key=key)


def value_loss(value_params, agent: Agent, target_q, obs):
    v = agent.value.apply(value_params, obs)
    return jnp.mean(expectile_loss(target_q - v, agent.expectile)), v


def advantage_weights(target_q, v, temperature: float):
    """w = min(exp(β·A), 100), A = min_i Q_θ̄i(s,a) − V_ψ(s): a constant for the actor loss."""
    return jnp.minimum(jnp.exp(temperature * (target_q - v)), 100.0)


def actor_loss(actor_params, agent: Agent, weights, obs, actions, dropout_key):
    mean, log_std = agent.actor.apply(actor_params, obs, training=True, rngs={"dropout": dropout_key})
    log_prob = gaussian_log_prob(mean, log_std, jnp.clip(actions, -1 + 1e-5, 1 - 1e-5))
    return -jnp.mean(weights * log_prob)


def critic_loss(critic_params, agent: Agent, target, obs, actions):
    q = agent.critic.apply(critic_params, obs, actions)
    return jnp.sum(jnp.mean((q - target) ** 2, axis=1)), q


def update(state: TrainState, batch, agent: Agent):
    """One IQL update: V, then the actor, then Q, then the target critics."""
    key, dropout_key = jax.random.split(state.key)
    obs, actions = batch["observations"], batch["actions"]
    target_q = agent.critic.apply(state.target_critic_params, obs, actions).min(0)

    (v_loss, v), grads = jax.value_and_grad(value_loss, has_aux=True)(state.value_params, agent, target_q, obs)
    updates, value_opt = agent.value_tx.update(grads, state.value_opt, state.value_params)
    value_params = optax.apply_updates(state.value_params, updates)

    v_new = agent.value.apply(value_params, obs)
    weights = advantage_weights(target_q, v_new, agent.temperature)
    pi_loss, grads = jax.value_and_grad(actor_loss)(state.actor_params, agent, weights, obs, actions, dropout_key)
    updates, actor_opt = agent.actor_tx.update(grads, state.actor_opt, state.actor_params)
    actor_params = optax.apply_updates(state.actor_params, updates)

    next_v = agent.value.apply(value_params, batch["next_observations"])
    target = batch["rewards"] + agent.gamma * (1.0 - batch["terminals"]) * next_v
    (q_loss, q), grads = jax.value_and_grad(critic_loss, has_aux=True)(state.critic_params, agent, target, obs, actions)
    updates, critic_opt = agent.critic_tx.update(grads, state.critic_opt, state.critic_params)
    critic_params = optax.apply_updates(state.critic_params, updates)
    target_critic_params = optax.incremental_update(critic_params, state.target_critic_params, agent.polyak)

    state = state.replace(actor_params=actor_params, critic_params=critic_params,
                          target_critic_params=target_critic_params, value_params=value_params,
                          actor_opt=actor_opt, critic_opt=critic_opt, value_opt=value_opt, key=key)
    metrics = {"value_loss": v_loss, "actor_loss": pi_loss, "critic_loss": q_loss, "q_mean": q.mean(),
               "v_mean": v.mean(), "adv_mean": (target_q - v_new).mean(), "weight_mean": weights.mean(),
               "weight_clipped": jnp.mean(weights >= 100.0)}
    return state, metrics


def train_chunk(state: TrainState, data, agent: Agent, num_updates: int):
    """`num_updates` offline updates fused in one lax.scan; batches sampled on the device."""

    def step(state, _):
        key, batch_key = jax.random.split(state.key)
        batch = common.sample_batch(batch_key, data, agent.batch_size)
        return update(state.replace(key=key), batch, agent)

    return jax.lax.scan(step, state, None, length=num_updates)


# ---------------------------------------------------------------------------------------------
# Online fine-tuning: one stochastic environment step, then one update on the union buffer
# ---------------------------------------------------------------------------------------------

def explore(agent: Agent, actor_params, obs, key):
    """a ~ π(·|s) = tanh'ed mean + σ·ε, clipped to the action box (the authors' sampling temperature 1,
    unrelated to β = `temperature`)."""
    mean, log_std = agent.actor.apply(actor_params, obs)
    return jnp.clip(mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape), -1.0, 1.0)


def online_step(state: TrainState, transition, next_obs, t, agent: Agent, reward_scale: float, reward_bias: float):
    """Store the transition (rewards transformed as the dataset's), update, act at s'."""
    transition = {k: transition[k] for k in state.buffer.data}
    transition["rewards"] = transition["rewards"] * reward_scale + reward_bias
    state = state.replace(buffer=state.buffer.add(jax.tree.map(lambda x: x[None], transition)))
    key, k_batch, k_act = jax.random.split(state.key, 3)
    state, metrics = update(state.replace(key=key), state.buffer.sample(k_batch, agent.batch_size), agent)
    return state, explore(agent, state.actor_params, next_obs, k_act), metrics


def first_action(state: TrainState, obs, agent: Agent):
    key, k_act = jax.random.split(state.key)
    return state.replace(key=key), explore(agent, state.actor_params, obs, k_act)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def make_agent(args: Args, obs_dim: int, act_dim: int) -> Agent:
    """Networks, optimisers and the family's τ, β and dropout (explicit flags win)."""
    expectile, temperature, dropout, _ = FAMILIES[args.family]
    expectile = expectile if args.expectile is None else args.expectile
    temperature = temperature if args.temperature is None else args.temperature
    dropout = (dropout or 0.0) if args.dropout is None else args.dropout
    decay = (args.online_steps == 0) if args.cosine_decay is None else args.cosine_decay
    actor_lr = optax.cosine_decay_schedule(args.actor_lr, args.total_steps) if decay else args.actor_lr
    return Agent(actor=Actor(args.hidden, act_dim, dropout), critic=TwinCritic(args.hidden, args.critic_layernorm),
                 value=ValueCritic(args.hidden, args.critic_layernorm), actor_tx=optax.adam(actor_lr),
                 critic_tx=optax.adam(args.critic_lr), value_tx=optax.adam(args.value_lr), expectile=expectile,
                 temperature=temperature, gamma=args.gamma, polyak=args.polyak, batch_size=args.batch_size)


def main(args: Args) -> dict:
    args = common.resume_args(args)
    check_args(args)
    reward_kind = FAMILIES[args.family][3]

    dataset = common.load_dataset(args.dataset)
    if reward_kind == "normalize":
        reward_scale, reward_bias = locomotion_reward_scale(dataset), 0.0
    else:
        reward_scale, reward_bias = {"minus_one": (1.0, -1.0), "none": (1.0, 0.0)}[reward_kind]
    dataset, _ = common.subsample(dataset, args.data_fraction, args.num_transitions)
    data = common.device_arrays(dataset, reward_scale=reward_scale, reward_bias=reward_bias)
    obs_dim, act_dim = dataset.observations.shape[1], dataset.actions.shape[1]

    agent = make_agent(args, obs_dim, act_dim)
    state = jax.vmap(lambda k: create_state(k, agent, obs_dim, act_dim))(common.seed_keys(args.seed, args.num_seeds))

    def with_buffer(state):  # the online buffer starts with the (transformed) training set, after --data-fraction
        n = len(dataset)
        buffer = common.ReplayBuffer.create({k: data[k][0] for k in common.TRANSITION_KEYS}, n + args.online_steps,
                                            initial={k: data[k] for k in common.TRANSITION_KEYS})
        return state.replace(buffer=common.stack_seeds(buffer, args.num_seeds))

    run = common.Run("iql", args, args.total_steps + args.online_steps, (dataset.ref_min_score, dataset.ref_max_score))
    if run.checkpoint_step() > args.total_steps:  # an online checkpoint holds the buffer: the template needs one
        state = with_buffer(state)
    state, start = run.restore(state)
    evaluator = common.Evaluator(dataset.make_env, run.seeds, args.eval_episodes,
                                 policy=lambda params, obs: agent.actor.apply(params, obs)[0])
    q1 = MLP(args.hidden + (1,), args.critic_layernorm)  # SEEM of Q_θ1 alone

    def q1_params(critic):  # SEEM's P counts the parameters given: Q1's alone (seeds on axis 0, twins on 1)
        return {"params": jax.tree.map(lambda x: x[:, 0], critic["params"]["VmapMLP_0"])}

    seem = common.SeemMonitor(args.seem_every, data, lambda p, s, a: q1.apply(p, jnp.concatenate([s, a], -1))[:, 0],
                              args.gamma)
    mean_action = jax.jit(lambda params, obs: agent.actor.apply(params, obs)[0])

    def evaluate(state, step):
        returns = evaluator(state.actor_params, step)
        if step > args.total_steps:
            return returns
        return returns, seem(step, q1_params(state.critic_params),
                             lambda i, s: mean_action(common.tree_index(state.actor_params, i), s))


    chunk = jax.jit(jax.vmap(partial(train_chunk, agent=agent, num_updates=args.eval_every), in_axes=(0, None)),
                    donate_argnums=0)
    state = common.train_offline(run, state, chunk, data, evaluate, start=start, total=args.total_steps,
                                 eval_every=args.eval_every)
    if args.online_steps:
        if state.buffer is None:
            state = with_buffer(state)
        step_fn = jax.jit(jax.vmap(partial(online_step, agent=agent, reward_scale=reward_scale,
                                           reward_bias=reward_bias), in_axes=(0, 0, 0, None)), donate_argnums=0)
        common.train_online(run, state, common.vector_env(dataset.make_env, args.num_seeds), step_fn,
                            jax.jit(jax.vmap(partial(first_action, agent=agent))), evaluate,
                            start=max(start, args.total_steps), total=args.total_steps + args.online_steps,
                            eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                            env_offset=args.total_steps)
    return run.finish()


if __name__ == "__main__":
    common.cli(main, Args)
