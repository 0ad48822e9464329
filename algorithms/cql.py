"""Conservative Q-Learning, CQL(H) (Kumar, Zhou, Tucker and Levine, NeurIPS 2020), offline and online.

CQL learns a Q-function whose value under the policy lower-bounds the true value, by pushing Q
down at actions the policy (and a uniform proposal) would pick and up at the data's actions, on top
of a SAC actor-critic:

    y    = r + γ (1 − d) min_i Q_θ̄i(s', a'),   a' ~ π(·|s')        (--max-target-backup: max over N a')
    R_i  = E_s[ T log Σ_{a ∈ 3N} exp( (Q_θi(s,a) − log μ(a)) / T ) − Q_θi(s, a_data) ]
           over N uniform actions (μ = 0.5^|A|), N actions of π(·|s) and N of π(·|s') (both
           evaluated at s, with μ(a) = π(a|s) and π(a|s′) respectively): the importance-sampled CQL(H)
           of the authors' code; a log-sum, not a mean, so R_i carries a constant log 3N (no effect on
           the gradient, but it shifts the level --cql-target-gap is compared with)
    L_Q  = Σ_i [ E (Q_θi(s,a) − y)² + w R_i ]            (w = 5; --cql-lagrange: w α′ (R_i − gap))
    L_α′ = −½ Σ_i α′ w (R_i − gap)   (Lagrange form only: α′ grows while R_i > gap = --cql-target-gap)
    L_π  = E_s[ α log π(ã|s) − min_i Q_θi(s, ã) ],   L_α = −log α · E[log π(ã|s) + H̄],  H̄ = −|A|,
    with ã ~ π(·|s) reparameterised and d = 1 only at a true terminal state

Every loss is differentiated only with respect to its own parameters, all from the same state, as
in JaxCQL (young-geng), on which the Cal-QL authors built. The actor is a tanh-squashed Gaussian
whose log-std is m·raw + o with learnable scalars m (init 1) and o (init −1). Defaults are JaxCQL's
for MuJoCo (w = 5, N = 10, T = 1, 256x256 networks, single-sample backup, no entropy in the
backup, flax's default hidden initialisation under a small output layer) with the policy learning
rate 1e-4 of the original CQL code. Not included: the original code's 40k-step BC warm-up.

Online fine-tuning (`--online-steps`) keeps the regulariser on and uses the protocol of Cal-QL's
code, so that the two compare like for like: collect one trajectory with the stochastic policy,
then as many updates as it had steps, each batch half offline, half online (`--mixing-ratio`).

Run: python -m algorithms.cql --dataset offlax/halfcheetah/medium-v0 --num-seeds 3
"""

from __future__ import annotations

import dataclasses
from functools import partial

import flax
import flax.linen as nn
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax

import common


@dataclasses.dataclass
class Args:
    # --- experiment ---
    dataset: str = "offlax/hopper/medium-replay-v0"
    """Minari dataset id: local, remote (downloaded when online) or offlax/<env>/<quality>-v0 (built on first use)."""
    seed: int = 0
    """Seed of the first run; seed i of --num-seeds is seed + i."""
    num_seeds: int = 1
    """Independent seeds trained at once in one process (jax.vmap); equal to separate runs. Online, separate
    runs are cheaper: a seed's updates at the end of its trajectory run (masked) for every vmapped seed."""
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
    """Log SEEM of Q_θ1 (largest eigenvalue of the TD dynamics, on a fixed probe of 2,560 transitions) every
    this many offline updates; 0: never. X* = (s′, tanh of the actor's mean), Yue et al.'s definition."""
    # --- algorithm ---
    gamma: float = 0.99
    """Discount factor γ."""
    polyak: float = 0.005
    """Polyak rate of the target critics."""
    policy_lr: float = 1e-4
    """Adam learning rate of the actor and of log α."""
    qf_lr: float = 3e-4
    """Adam learning rate of the critics and of log α′ (Lagrange form)."""
    batch_size: int = 256
    """Transitions per update."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden widths of the actor."""
    critic_hidden: tuple[int, ...] = (256, 256)
    """Hidden widths of the critics."""
    orthogonal_init: bool = False
    """Orthogonal initialisation (gain √2 hidden, 1e-2 output layer); Cal-QL's default, not JaxCQL's."""
    critic_layernorm: bool = False
    """Linear -> LayerNorm -> ReLU in every hidden layer of the critics (Yue et al. 2023)."""
    cql_weight: float = 5.0
    """Weight w of the CQL regulariser (the paper's α)."""
    cql_n_actions: int = 10
    """Sampled actions N per kind (uniform, π(·|s), π(·|s'))."""
    cql_temp: float = 1.0
    """Temperature T of the logsumexp."""
    cql_importance_sample: bool = True
    """Importance-sampled logsumexp (min_q_version 3); off: plain logsumexp with the data action."""
    cql_lagrange: bool = False
    """Lagrange form: a learned α′ (log α′ starts at 1.0, as JaxCQL) keeps the regulariser at --cql-target-gap.
    This is JaxCQL's and Cal-QL's form, w α′ (R − gap); the original CQL code's is α′ (w R − gap)
    with log α′ from 0, so its AntMaze setting (w = 5, threshold 5) is --cql-target-gap 1 here."""
    cql_target_gap: float = 0.8
    """Target value gap of R_i in the Lagrange form (0.8, as in Cal-QL's AntMaze scripts)."""
    cql_clip_diff_min: float = -np.inf
    """Lower clip of the per-sample regulariser."""
    cql_clip_diff_max: float = np.inf
    """Upper clip of the per-sample regulariser."""
    max_target_backup: bool = False
    """Back up max_k min_i Q̄(s', a'_k) over --cql-n-actions policy samples (else one sample)."""
    backup_entropy: bool = False
    """Subtract α log π(a'|s') in the Bellman target."""
    target_entropy: float | None = None
    """Target entropy H̄ (default −|A|)."""
    reward_scale: float = 1.0
    """Rewards become scale * r + bias (the original CQL code: AntMaze (r − 0.5) * 4)."""
    reward_bias: float = 0.0
    """See --reward-scale."""
    data_fraction: float = 1.0
    """Train on this share of the dataset's transitions, drawn once at random (data-scarce study)."""
    num_transitions: int | None = None
    """Train on exactly this many transitions, drawn once at random (overrides --data-fraction)."""
    # --- online fine-tuning ---
    online_steps: int = 0
    """Environment steps of online fine-tuning after the offline phase (0: offline only)."""
    mixing_ratio: float = 0.5
    """Share of each online-phase batch drawn from the offline data (the rest from online data)."""
    online_cql_weight: float | None = None
    """Regulariser weight during fine-tuning (default: --cql-weight)."""
    checkpoint_every: int = 50_000
    """Online: environment steps between checkpoints (a multiple of --eval-every)."""


def check_args(args: Args) -> None:
    common.check_run_args(args, "cql_n_actions")
    if not 0 <= args.mixing_ratio <= 1:
        raise SystemExit(f"--mixing-ratio must lie in [0, 1], got {args.mixing_ratio}")
    if not 0 < args.gamma <= 1:
        raise SystemExit("--gamma must lie in (0, 1]")


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------

class MLP(nn.Module):
    """ReLU MLP; with `orthogonal`, hidden kernels orthogonal(√2) and the output kernel orthogonal(1e-2),
    otherwise flax's default hidden kernels and a small uniform output kernel (variance scaling 1e-2,
    fan-in): both as JaxCQL in Cal-QL's code, so the first policy is the same at every state (tanh of mean
    ≈ 0, σ ≈ e^−1) and Q starts near 0."""

    hidden: tuple[int, ...]
    out: int
    orthogonal: bool = False
    layernorm: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.orthogonal(np.sqrt(2.0)) if self.orthogonal else nn.linear.default_kernel_init
        for width in self.hidden:
            x = nn.Dense(width, kernel_init=init)(x)
            if self.layernorm:
                x = nn.LayerNorm()(x)
            x = nn.relu(x)
        out_init = (nn.initializers.orthogonal(1e-2) if self.orthogonal
                    else nn.initializers.variance_scaling(1e-2, "fan_in", "uniform"))
        return nn.Dense(self.out, kernel_init=out_init)(x)


class TwinCritic(nn.Module):
    """Q_θ1, Q_θ2 on concat(s, a); output shape (2, ...batch)."""

    hidden: tuple[int, ...]
    orthogonal: bool = False
    layernorm: bool = False

    @nn.compact
    def __call__(self, obs, action):
        twin = nn.vmap(MLP, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None,
                       out_axes=0, axis_size=2)
        x = jnp.concatenate([obs, action], -1)
        return twin(self.hidden, 1, self.orthogonal, self.layernorm)(x).squeeze(-1)


class Actor(nn.Module):
    """Tanh-squashed Gaussian; log σ = clip(m · raw + o, −20, 2) with learnable scalars m, o."""

    hidden: tuple[int, ...]
    action_dim: int
    orthogonal: bool = False

    @nn.compact
    def __call__(self, obs):
        mean, raw = jnp.split(MLP(self.hidden, 2 * self.action_dim, self.orthogonal)(obs), 2, axis=-1)
        m = self.param("log_std_multiplier", nn.initializers.ones, ())
        o = self.param("log_std_offset", lambda _, shape: -jnp.ones(shape), ())
        return mean, jnp.clip(m * raw + o, -20.0, 2.0)


def sample_action(actor: Actor, params, obs, key, num_samples: int | None = None):
    """u = mean + σ ε, ã = tanh(u), log π(ã|s) = Σ_j [log N(u_j; mean_j, σ_j) − log(1 − tanh(u_j)²)].

    With `num_samples` N: N actions per state, shape (B, N, |A|), from one actor pass per state
    (running the actor on N copies of each state would cost N times as much for the same draws)."""
    mean, log_std = actor.apply(params, obs)
    if num_samples is not None:
        mean, log_std = (jnp.broadcast_to(x[:, None], (x.shape[0], num_samples, x.shape[-1])) for x in (mean, log_std))
    eps = jax.random.normal(key, mean.shape)
    u = mean + jnp.exp(log_std) * eps
    log_normal = -0.5 * eps ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
    log_det = 2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u))
    return jnp.tanh(u), jnp.sum(log_normal - log_det, axis=-1)


# ---------------------------------------------------------------------------------------------
# The regulariser
# ---------------------------------------------------------------------------------------------

def cql_regularizer(q_data, q_rand, q_cur, q_next, logp_cur, logp_next, action_dim: int, temp: float,
                    importance_sample: bool):
    """Per-sample CQL(H) gap logsumexp(OOD actions) − Q(s, a_data), for each critic: shape (2, B).

    q_data (2, B); q_rand, q_cur, q_next (2, B, N) at the current state s; logp_* (B, N)."""
    if importance_sample:
        log_uniform = action_dim * np.log(0.5)  # density of U[−1, 1]^|A|
        cat = jnp.concatenate([q_rand - log_uniform, q_next - logp_next[None], q_cur - logp_cur[None]], axis=-1)
    else:
        cat = jnp.concatenate([q_rand, q_data[..., None], q_next, q_cur], axis=-1)
    return temp * jax.nn.logsumexp(cat / temp, axis=-1) - q_data


# ---------------------------------------------------------------------------------------------
# Train state and the update
# ---------------------------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
    actor_params: dict
    critic_params: dict
    target_critic_params: dict
    log_alpha: jax.Array
    log_alpha_prime: jax.Array
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    alpha_opt: optax.OptState
    alpha_prime_opt: optax.OptState
    key: jax.Array
    buffer: common.ReplayBuffer | None = None  # online transitions
    trajectory: dict | None = None  # the trajectory being collected, one row per step
    trajectory_length: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Agent:
    """Networks, optimisers and hyper-parameters: the static parts, closed over by jit."""

    actor: Actor
    critic: TwinCritic
    actor_tx: optax.GradientTransformation
    critic_tx: optax.GradientTransformation
    alpha_tx: optax.GradientTransformation
    alpha_prime_tx: optax.GradientTransformation
    args: Args
    action_dim: int
    target_entropy: float


def create_state(key, agent: Agent, obs_dim: int) -> TrainState:
    key, k_actor, k_critic = jax.random.split(key, 3)
    obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, agent.action_dim))
    actor_params = agent.actor.init(k_actor, obs)
    critic_params = agent.critic.init(k_critic, obs, act)
    log_alpha, log_alpha_prime = jnp.zeros(()), jnp.ones(())  # log α′ starts at 1.0, as the authors'
    return TrainState(
        actor_params=actor_params, critic_params=critic_params,
        target_critic_params=jax.tree.map(jnp.copy, critic_params),  # equal values, own buffers (donation)
        log_alpha=log_alpha, log_alpha_prime=log_alpha_prime, actor_opt=agent.actor_tx.init(actor_params),
        critic_opt=agent.critic_tx.init(critic_params), alpha_opt=agent.alpha_tx.init(log_alpha),
        alpha_prime_opt=agent.alpha_prime_tx.init(log_alpha_prime), key=key)


def update(state: TrainState, batch, agent: Agent, cql_weight: float):
    """One CQL update: actor, α, critics (TD + regulariser) and α′ from the same state."""
    a = agent.args
    # k_next: the backup's a′ ~ π(·|s′); k_nxt: the regulariser's N samples of π(·|s′)
    key, k_pi, k_next, k_rand, k_cur, k_nxt = jax.random.split(state.key, 6)
    obs, next_obs, B, N = batch["observations"], batch["next_observations"], batch["rewards"].shape[0], a.cql_n_actions
    alpha = jnp.exp(state.log_alpha)

    # -- actor and entropy coefficient α (current critics) --
    def actor_loss(params):
        act, logp = sample_action(agent.actor, params, obs, k_pi)
        return jnp.mean(alpha * logp - agent.critic.apply(state.critic_params, obs, act).min(0)), logp

    (pi_loss, logp), actor_grads = jax.value_and_grad(actor_loss, has_aux=True)(state.actor_params)
    alpha_loss, alpha_grad = jax.value_and_grad(
        lambda la: -la * jnp.mean(jax.lax.stop_gradient(logp) + agent.target_entropy))(state.log_alpha)

    # -- Bellman target (target critics) --
    def repeat(x):  # (B, d) -> (B, N, d)
        return jnp.broadcast_to(x[:, None], (B, N) + x.shape[1:])

    if a.max_target_backup:
        next_a, next_logp = sample_action(agent.actor, state.actor_params, next_obs, k_next, N)
        next_q = agent.critic.apply(state.target_critic_params, repeat(next_obs), next_a).min(0)  # (B, N)
        best = jnp.argmax(next_q, axis=1)
        next_q, next_logp = jnp.take_along_axis(next_q, best[:, None], 1)[:, 0], jnp.take_along_axis(
            next_logp, best[:, None], 1)[:, 0]
    else:
        next_a, next_logp = sample_action(agent.actor, state.actor_params, next_obs, k_next)
        next_q = agent.critic.apply(state.target_critic_params, next_obs, next_a).min(0)
    if a.backup_entropy:
        next_q = next_q - alpha * next_logp
    y = batch["rewards"] + a.gamma * (1.0 - batch["terminals"]) * next_q

    # -- the regulariser's sampled actions (constants for the critic loss) --
    rand_a = jax.random.uniform(k_rand, (B, N, agent.action_dim), minval=-1.0, maxval=1.0)
    cur_a, logp_cur = sample_action(agent.actor, state.actor_params, obs, k_cur, N)
    nxt_a, logp_nxt = sample_action(agent.actor, state.actor_params, next_obs, k_nxt, N)
    alpha_prime = jnp.clip(jnp.exp(state.log_alpha_prime), 0.0, 1e6)

    def critic_loss(params):
        q_data = agent.critic.apply(params, obs, batch["actions"])  # (2, B)
        td = jnp.mean((q_data - y) ** 2, axis=1)  # (2,)
        q_at = lambda act: agent.critic.apply(params, repeat(obs), act)  # noqa: E731  Q(s, ·): (2, B, N)
        gap = cql_regularizer(q_data, q_at(rand_a), q_at(cur_a), q_at(nxt_a), logp_cur, logp_nxt,
                              agent.action_dim, a.cql_temp, a.cql_importance_sample)
        # R_i of the docstring, per critic: (2,)
        diff = jnp.mean(jnp.clip(gap, a.cql_clip_diff_min, a.cql_clip_diff_max), axis=1)
        reg = alpha_prime * cql_weight * (diff - a.cql_target_gap) if a.cql_lagrange else cql_weight * diff
        return jnp.sum(td + reg), (q_data, td, diff)

    (q_loss, (q_data, td, diff)), critic_grads = jax.value_and_grad(critic_loss, has_aux=True)(
        state.critic_params)
    alpha_prime_loss, alpha_prime_grad = jax.value_and_grad(
        lambda lap: -0.5 * jnp.sum(jnp.clip(jnp.exp(lap), 0.0, 1e6) * cql_weight
                                   * (jax.lax.stop_gradient(diff) - a.cql_target_gap)))(state.log_alpha_prime)

    # -- apply every update --
    def step(tx, grads, opt, params):
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    actor_params, actor_opt = step(agent.actor_tx, actor_grads, state.actor_opt, state.actor_params)
    critic_params, critic_opt = step(agent.critic_tx, critic_grads, state.critic_opt, state.critic_params)
    log_alpha, alpha_opt = step(agent.alpha_tx, alpha_grad, state.alpha_opt, state.log_alpha)
    log_alpha_prime, alpha_prime_opt = state.log_alpha_prime, state.alpha_prime_opt
    if a.cql_lagrange:
        log_alpha_prime, alpha_prime_opt = step(agent.alpha_prime_tx, alpha_prime_grad, state.alpha_prime_opt,
                                                state.log_alpha_prime)
    state = state.replace(
        actor_params=actor_params, critic_params=critic_params, log_alpha=log_alpha, log_alpha_prime=log_alpha_prime,
        target_critic_params=optax.incremental_update(critic_params, state.target_critic_params, a.polyak),
        actor_opt=actor_opt, critic_opt=critic_opt, alpha_opt=alpha_opt, alpha_prime_opt=alpha_prime_opt, key=key)
    metrics = {"critic_loss": q_loss, "td_loss": td.mean(), "cql_diff": diff.mean(), "actor_loss": pi_loss,
               "alpha": alpha, "alpha_prime": alpha_prime * a.cql_lagrange,  # 0 when unused, as JaxCQL logs it
               "q_mean": q_data.mean(), "target_q": y.mean(),
               "entropy": -logp.mean()}
    return state, metrics


def train_chunk(state: TrainState, data, agent: Agent, num_updates: int):
    """`num_updates` offline updates fused in one lax.scan; batches sampled on the device."""

    def body(state, _):
        key, batch_key = jax.random.split(state.key)
        batch = common.sample_batch(batch_key, data, agent.args.batch_size)
        return update(state.replace(key=key), batch, agent, agent.args.cql_weight)

    return jax.lax.scan(body, state, None, length=num_updates)


# ---------------------------------------------------------------------------------------------
# Online fine-tuning: a whole trajectory, then as many updates as its steps
# ---------------------------------------------------------------------------------------------

def online_step(state: TrainState, transition, next_obs, t, offline, agent: Agent, cql_weight: float):
    """One environment step for one seed. The transition joins the trajectory being collected; when
    the episode ends, the trajectory enters the online buffer and len(trajectory) updates follow,
    each on a batch mixed from offline and online data (Cal-QL's protocol, for a like comparison).

    Written without lax.cond: under vmap a per-seed condition would run both branches, so the
    trajectory is always written with its rows masked, and the update loop runs n times, with n = 0
    for seeds whose episode goes on."""
    a = agent.args
    row = {k: transition[k] for k in common.TRANSITION_KEYS}
    row["rewards"] = row["rewards"] * a.reward_scale + a.reward_bias
    traj = jax.tree.map(lambda buf, x: buf.at[state.trajectory_length].set(x), state.trajectory, row)
    length = state.trajectory_length + 1
    n = jnp.where(transition["episode_ends"] > 0, length, 0)  # updates to run now

    state = state.replace(buffer=state.buffer.add(traj, count=n), trajectory=traj, trajectory_length=length - n)

    def one_update(_, carry):
        state, sums = carry
        key, k_batch = jax.random.split(state.key)
        batch = common.sample_mixed(k_batch, offline, state.buffer, a.batch_size, a.mixing_ratio)
        state, m = update(state.replace(key=key), batch, agent, cql_weight)
        return state, jax.tree.map(jnp.add, sums, m)

    shapes = jax.eval_shape(lambda s: update(s, common.sample_mixed(s.key, offline, s.buffer, a.batch_size,
                                                                    a.mixing_ratio), agent, cql_weight)[1], state)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    state, sums = jax.lax.fori_loop(0, n, one_update, (state, zeros))
    metrics = jax.tree.map(lambda x: x / jnp.maximum(n, 1), sums)
    key, k_act = jax.random.split(state.key)
    action, _ = sample_action(agent.actor, state.actor_params, next_obs[None], k_act)
    return state.replace(key=key), action[0], dict(metrics, num_updates=n)


def first_action(state: TrainState, obs, agent: Agent):
    key, k_act = jax.random.split(state.key)
    action, _ = sample_action(agent.actor, state.actor_params, obs[None], k_act)
    return state.replace(key=key), action[0]


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def make_agent(args: Args, obs_dim: int, act_dim: int) -> Agent:
    return Agent(actor=Actor(args.hidden, act_dim, args.orthogonal_init),
                 critic=TwinCritic(args.critic_hidden, args.orthogonal_init, args.critic_layernorm),
                 actor_tx=optax.adam(args.policy_lr), critic_tx=optax.adam(args.qf_lr),
                 alpha_tx=optax.adam(args.policy_lr), alpha_prime_tx=optax.adam(args.qf_lr), args=args,
                 action_dim=act_dim,
                 target_entropy=-float(act_dim) if args.target_entropy is None else args.target_entropy)


def main(args: Args) -> dict:
    args = common.resume_args(args)
    check_args(args)
    dataset = common.load_dataset(args.dataset)
    dataset, _ = common.subsample(dataset, args.data_fraction, args.num_transitions)
    data = common.device_arrays(dataset, reward_scale=args.reward_scale, reward_bias=args.reward_bias)
    obs_dim, act_dim = dataset.observations.shape[1], dataset.actions.shape[1]

    agent = make_agent(args, obs_dim, act_dim)
    state = jax.vmap(lambda k: create_state(k, agent, obs_dim))(common.seed_keys(args.seed, args.num_seeds))

    max_len = gym.make(dataset.env_spec).spec.max_episode_steps if args.online_steps else 0

    def online_state(state):  # the online buffer, and room for one trajectory
        row = {k: data[k][0] for k in common.TRANSITION_KEYS}
        # room for every online step, and at least one whole trajectory (a shorter buffer would have
        # the trajectory's rows overwrite each other when it is added)
        buffer = common.ReplayBuffer.create(row, max(args.online_steps, max_len))
        trajectory = {k: jnp.zeros((max_len,) + v.shape) for k, v in row.items()}
        return state.replace(**common.stack_seeds(
            {"buffer": buffer, "trajectory": trajectory, "trajectory_length": jnp.zeros((), jnp.int32)},
            args.num_seeds))

    run = common.Run("cql", args, args.total_steps + args.online_steps,
                     (dataset.ref_min_score, dataset.ref_max_score))
    if run.checkpoint_step() > args.total_steps:
        state = online_state(state)
    state, start = run.restore(state)
    evaluator = common.Evaluator(dataset.make_env, run.seeds, args.eval_episodes,
                                 policy=lambda params, obs: jnp.tanh(agent.actor.apply(params, obs)[0]))
    q1 = MLP(args.critic_hidden, 1, args.orthogonal_init, args.critic_layernorm)  # SEEM of Q_θ1 alone

    def q1_params(critic):  # SEEM's P counts the parameters given: Q1's alone (seeds on axis 0, twins on 1)
        return {"params": jax.tree.map(lambda x: x[:, 0], critic["params"]["VmapMLP_0"])}

    seem = common.SeemMonitor(args.seem_every, data, lambda p, s, a: q1.apply(p, jnp.concatenate([s, a], -1))[:, 0],
                              args.gamma)
    mean_action = jax.jit(lambda params, obs: jnp.tanh(agent.actor.apply(params, obs)[0]))

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
            state = online_state(state)
        weight = args.cql_weight if args.online_cql_weight is None else args.online_cql_weight
        step_fn = jax.jit(jax.vmap(partial(online_step, agent=agent, cql_weight=weight),
                                   in_axes=(0, 0, 0, None, None)), donate_argnums=0)
        common.train_online(run, state, common.vector_env(dataset.make_env, args.num_seeds), step_fn,
                            jax.jit(jax.vmap(partial(first_action, agent=agent))), evaluate,
                            start=max(start, args.total_steps), total=args.total_steps + args.online_steps,
                            eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                            env_offset=args.total_steps, step_args=(data,))
    return run.finish()


if __name__ == "__main__":
    common.cli(main, Args)
