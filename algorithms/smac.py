"""Score-Matched Actor-Critic (SMAC; de Lara and Shkurti, ICML 2026), offline, then SAC or TD3 online.

Offline RL pre-training often leaves a Q-function from which online fine-tuning first falls
(the score drops before it climbs). SMAC's idea: in maximum-entropy RL the optimal policy is
π*(a|s) ∝ exp(Q*(s,a)/α), so ∇_a log π*(a|s) = ∇_a Q*(s,a)/α. Offline, SMAC asks the critic's
action-gradient to match the score of the data's behaviour policy, up to a learned state-dependent
scale, at actions drawn half from the current policy and half uniformly over the action box:

    L^SM(θ, ψ)  = Σ_i E_{s~D, a~B(A)} ‖ ∇_a Q_θi(s, a) − α_ψ(s) · ε_ω(s, a, w, 1) ‖²
    L^SMAC(θ,ψ) = κ · L^SM(θ, ψ) + L^AC(θ)

where ε_ω is a diffusion model of the data's actions (DDPM ε-prediction, IDQL's residual network),
read at its first noise step k = 1, where ε_ω(s, a, w, 1) ≈ −√(1 − ᾱ_1) ∇_a log p_1(a|s, w), p_1 being
the density of the step-1 noisy actions √ᾱ_1 a + √(1 − ᾱ_1) ε: a slightly shrunk, smoothed π^D, positive
over the whole box, so that it has a score at uniform actions too. α_ψ(s) absorbs the scale and the sign:
if ∇_a Q = α ∇_a log π^D and p_1 ≈ π^D, then α_ψ ≈ −α / √(1 − ᾱ_1) < 0. Left free, α_ψ would also accept
a critic that rises *away* from the data's actions (∇_a Q ∝ +ε), so by default it is kept negative,
α_ψ = −softplus(MLP(s)) (`--scale-sign free` lifts that). L^AC is SAC's unchanged (twin critics, entropy
in the backup, automatic temperature with target H̄ = −|A|), with ã' ~ π(·|s') and ã ~ π(·|s):

    y = r + γ (1 − d) ( min_i Q_θ̄i(s', ã') − α log π(ã'|s') ),   L^AC = Σ_i E (Q_θi(s,a) − y)²
    L_π = E_s[ α log π(ã|s) − min_i Q_θi(s, ã) ],                 L_α = E_s[ −α (log π(ã|s) + H̄) ]

(Three alphas: α is SAC's temperature, α_ψ(s) the learned scale, ᾱ_k the diffusion schedule's
cumulative signal fraction.) A run has three phases, in this order in main(): 1. ε_ω alone,
--score-steps DDPM updates, then frozen; 2. --total-steps offline updates of L^SMAC and L_π;
3. --online-steps of SAC (the regulariser off) or TD3.

∇_a Q is taken with `jax.vjp` inside the critic loss, so its gradient with respect to θ is a
second-order derivative, which JAX differentiates exactly. The paper replaces Adam by Muon
(`optax.contrib.muon`): orthogonalised momentum for the kernels of every layer of the actor, critics
and α_ψ but the output layer (the first, input layer included); output layers, biases and scalars
take optax's Adam branch of Muon, which follows Muon's Nesterov switch (with its own b1 = 0.9), so
NAdam. Online (`--online-steps`), the pre-trained actor and critics continue with plain SAC
(`--online-algo sac`, the regulariser off) or TD3 (`--online-algo td3`: the actor's tanh-mean becomes
the deterministic policy), `--online-utd` updates (default 1) per environment step on batches half
offline, half online.

Not specified by the paper's public material, so explicit flags here (defaults documented at
each flag and in the README): κ (`--kappa`), the form of α_ψ (`--scale-sign`), the reward signal
w of the RvS conditioning (`--score-condition`, `--score-w`: here the trajectory's return, min–max
normalised over the dataset, and w = 1 when reading the score), the diffusion schedule (IDQL's: 5
steps, variance-preserving; `--diffusion-steps` also sets the noise level σ_1 at which the score is
read), SAC's temperature (`--alpha`: tuned automatically unless fixed), Muon's reach and scale
(`--muon-output-layers`, `--muon-rms`) and the fine-tuning replay and update ratio
(`--mixing-ratio`: half offline, half online batches, as Cal-QL; `--online-utd`).

Run: python -m algorithms.smac --dataset offlax/hopper/medium-replay-v0 --online-steps 100000 --num-seeds 3
One pre-training, two fine-tunings: train with --online-steps 0, then fine-tune that run folder with
--offline-from RUN --online-steps 100000 --online-algo sac (and again with td3).
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path
from typing import Literal

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import common

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


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
    """Offline actor-critic updates per seed (after the score model's own --score-steps)."""
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
    """Log SEEM of Q_θ1 (on a fixed probe of 2,560 transitions) every this many offline updates; 0: never."""
    # --- the behaviour score model ε_ω ---
    score_steps: int = 100_000
    """Updates of the diffusion model, trained first (then frozen; none at κ = 0); IDQL trains longer on a GPU."""
    diffusion_steps: int = 5
    """Noise steps T of the DDPM (IDQL: 5, variance-preserving schedule); the score is read at k = 1, whose noise
    level σ_1 = √(1 − ᾱ_1) depends on T (0.44 at T = 5, 0.04 at T = 100): a smoother or sharper data density."""
    score_hidden: int = 256
    """Width of the residual network of ε_ω (IDQL: 256, each block expands 4x)."""
    score_blocks: int = 3
    """Residual blocks of ε_ω (IDQL: 3)."""
    score_lr: float = 3e-4
    """Adam learning rate of ε_ω."""
    score_condition: bool = True
    """RvS conditioning: ε_ω also sees w, the transition's trajectory return min–max normalised over the dataset."""
    score_w: float = 1.0
    """The w at which the score is read in the regulariser (1: the best trajectories' actions)."""
    score_from: str | None = None
    """Reuse the trained ε_ω of this earlier SMAC run folder (same dataset, seeds and score settings) instead of
    training one, so that ablations of the actor-critic phase share one behaviour model; the run then equals one that
    trains ε_ω itself (ε_ω draws from its own random stream, see score_chunk). Not needed at κ = 0."""
    offline_from: str | None = None
    """Skip the offline phase: fine-tune the finished offline phase of this earlier SMAC run folder (one made
    with --online-steps 0 and the same offline settings), so that one pre-training is fine-tuned with both
    --online-algo sac and td3. Its log is copied up to the start of fine-tuning."""
    # --- SMAC ---
    kappa: float = 1.0
    """Weight κ of the score-matching regulariser (0: plain offline SAC, the ablation). 1: the lowest regret
    of 0, 0.1, 1, 10 and 100 in a pilot on hopper medium-replay (benchmarks/results/smac_pilot.md)."""
    scale_sign: Literal["negative", "free"] = "negative"
    """α_ψ(s) = −softplus(MLP(s)), the sign theory gives (ε_ω ∝ −score), or a free linear output."""
    optimizer: Literal["muon", "adam"] = "muon"
    """Muon for the actor's, critics' and α_ψ's layer kernels but the output layers' (NAdam, optax's Adam
    branch of Muon, for the rest), or plain Adam throughout; offline and online alike (fine-tuning
    continues with the offline optimisers and their states). Muon's Newton-Schulz steps are half of the
    offline update's FLOPs at the default sizes (4.1 against 2.05 GFLOP, benchmarks/results/throughput_avx2.md)."""
    muon_output_layers: bool = False
    """Muon also for the output layers' kernels (the usual practice, followed by default, leaves them to Adam)."""
    muon_rms: float = 0.2
    """Muon's consistent-RMS factor: updates scaled to Adam's typical RMS, so both share one learning rate."""
    gamma: float = 0.99
    """Discount factor γ."""
    polyak: float = 0.005
    """Polyak rate of the target networks."""
    actor_lr: float = 3e-4
    """Learning rate of the actor."""
    critic_lr: float = 3e-4
    """Learning rate of the critics and of α_ψ."""
    alpha_lr: float = 3e-4
    """Adam learning rate of log α (SAC's temperature)."""
    alpha: float | None = None
    """A fixed SAC temperature α; None: tuned automatically toward the target entropy (from α = 1)."""
    target_entropy: float | None = None
    """Target entropy H̄ (default −|A|)."""
    batch_size: int = 256
    """Transitions per update (the regulariser uses the same states)."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden widths of actor, critics and α_ψ."""
    critic_layernorm: bool = False
    """Linear -> LayerNorm -> ReLU in every hidden layer of the critics (Yue et al. 2023)."""
    # --- online fine-tuning ---
    online_steps: int = 0
    """Environment steps of online fine-tuning after the offline phase (0: offline only)."""
    online_algo: Literal["sac", "td3"] = "sac"
    """The online learner, starting from the offline actor and critics."""
    mixing_ratio: float = 0.5
    """Share of each online batch drawn from the offline data (Cal-QL's 0.5; 0: online data only)."""
    online_utd: int = 1
    """Online updates per environment step (update-to-data ratio); updates start at the first online step,
    with no warm-up (as CQL's and Cal-QL's fine-tuning here, so that the early dip is compared alike)."""
    td3_exploration_noise: float = 0.1
    """TD3: std of the Gaussian noise added to the deterministic action when acting."""
    td3_policy_noise: float = 0.2
    """TD3: std of the target policy smoothing noise."""
    td3_noise_clip: float = 0.5
    """TD3: clip of the target policy smoothing noise."""
    td3_policy_delay: int = 2
    """TD3: critic updates per actor and target update."""
    checkpoint_every: int = 50_000
    """Online: environment steps between checkpoints (a multiple of --eval-every)."""


def check_args(args: Args) -> None:
    common.check_run_args(args, "diffusion_steps", "score_hidden", "score_blocks", "td3_policy_delay", "online_utd")
    if args.score_steps < 0 or args.online_steps < 0 or args.kappa < 0:
        raise SystemExit("--score-steps, --online-steps and --kappa must be >= 0")
    if args.batch_size < 2:
        raise SystemExit("--batch-size must be at least 2 (half policy, half uniform actions in the regulariser)")
    if not 0 <= args.mixing_ratio <= 1:
        raise SystemExit(f"--mixing-ratio must lie in [0, 1], got {args.mixing_ratio}")
    if not 0 < args.gamma <= 1:
        raise SystemExit("--gamma must lie in (0, 1]")
    if args.alpha is not None and args.alpha <= 0:
        raise SystemExit(f"--alpha must be positive (or left unset to tune it), got {args.alpha}")


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------

class MLP(nn.Module):
    """ReLU MLP ending in a linear layer named "out" (Muon leaves output layers to Adam)."""

    hidden: tuple[int, ...]
    out: int
    layernorm: bool = False

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.Dense(width)(x)
            if self.layernorm:
                x = nn.LayerNorm()(x)
            x = nn.relu(x)
        return nn.Dense(self.out, name="out")(x)


class TwinCritic(nn.Module):
    """Q_θ1, Q_θ2 on concat(s, a) as two separate MLPs (2-D kernels, as Muon expects): (2, batch)."""

    hidden: tuple[int, ...]
    layernorm: bool = False

    @nn.compact
    def __call__(self, obs, action):
        x = jnp.concatenate([obs, action], -1)
        return jnp.stack([MLP(self.hidden, 1, self.layernorm, name=f"q{i}")(x)[..., 0] for i in (1, 2)])


class Actor(nn.Module):
    """s -> (mean, log_std) of the Gaussian before the tanh squashing (SAC's actor)."""

    hidden: tuple[int, ...]
    action_dim: int

    @nn.compact
    def __call__(self, obs):
        mean, log_std = jnp.split(MLP(self.hidden, 2 * self.action_dim)(obs), 2, axis=-1)
        return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


class ScoreScale(nn.Module):
    """α_ψ(s): the learned state-dependent factor between ∇_a Q and ε_ω; −softplus(·) < 0 if `negative`."""

    hidden: tuple[int, ...]
    negative: bool = True

    @nn.compact
    def __call__(self, obs):
        raw = MLP(self.hidden, 1)(obs)[..., 0]
        return -nn.softplus(raw) if self.negative else raw


class NoiseModel(nn.Module):
    """ε_ω(s, a_k, w, k): IDQL's residual MLP. Input [s, a_k, w, emb(k)] -> width h; each block is
    x + Dense_h(swish(Dense_4h(LayerNorm(x)))); then swish and a linear map to |A|."""

    action_dim: int
    hidden: int = 256
    blocks: int = 3

    @nn.compact
    def __call__(self, obs, noisy_action, w, k):
        freqs = jnp.exp(jnp.linspace(0.0, np.log(100.0), 8))  # sinusoidal embedding of the step k
        angles = k[..., None].astype(jnp.float32) * freqs
        emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1)
        emb = nn.Dense(32)(nn.swish(nn.Dense(32)(emb)))
        x = nn.Dense(self.hidden)(jnp.concatenate([obs, noisy_action, w[..., None], emb], -1))
        for _ in range(self.blocks):
            x = x + nn.Dense(self.hidden)(nn.swish(nn.Dense(4 * self.hidden)(nn.LayerNorm()(x))))
        return nn.Dense(self.action_dim)(nn.swish(x))


# ---------------------------------------------------------------------------------------------
# The behaviour score model ε_ω (trained first, then frozen)
# ---------------------------------------------------------------------------------------------

def vp_schedule(num_steps: int) -> jnp.ndarray:
    """ᾱ_k, k = 1..T, of IDQL's variance-preserving schedule: β_k = 1 − exp(−b_min/T −
    ½(b_max − b_min)(2k − 1)/T²), b_min = 0.1, b_max = 10, and ᾱ_k = Π_{j≤k} (1 − β_j)."""
    k = np.arange(1, num_steps + 1)
    alphas = np.exp(-0.1 / num_steps - 0.5 * (10.0 - 0.1) * (2 * k - 1) / num_steps ** 2)
    return jnp.asarray(np.cumprod(alphas), jnp.float32)


def diffusion_loss(noise_model: NoiseModel, params, alpha_bar, obs, actions, w, key):
    """DDPM ε-prediction: E_{k, ε} ‖ε_ω(s, √ᾱ_k a + √(1 − ᾱ_k) ε, w, k) − ε‖², k ~ U{1..T}."""
    k_step, k_eps = jax.random.split(key)
    k = jax.random.randint(k_step, (actions.shape[0],), 1, alpha_bar.shape[0] + 1)
    eps = jax.random.normal(k_eps, actions.shape)
    ab = alpha_bar[k - 1][:, None]
    noisy = jnp.sqrt(ab) * actions + jnp.sqrt(1.0 - ab) * eps
    return jnp.mean(jnp.sum((noise_model.apply(params, obs, noisy, w, k) - eps) ** 2, -1))


def behaviour_score(noise_model: NoiseModel, params, alpha_bar, obs, actions, w):
    """∇_a log p_1(a|s, w) ≈ −ε_ω(s, a, w, 1) / √(1 − ᾱ_1): the data's score at the first noise step.
    Not called in training (the regulariser matches ε_ω itself and α_ψ absorbs −1/√(1 − ᾱ_1)): the
    definition, and what the tests check against the analytic score."""
    k = jnp.ones(actions.shape[:-1], jnp.int32)
    return -noise_model.apply(params, obs, actions, w, k) / jnp.sqrt(1.0 - alpha_bar[0])


def sample_action(actor: Actor, params, obs, key):
    """ã = tanh(μ + σ ε) and log π(ã|s) = Σ_j [log N(u_j; μ_j, σ_j) − log(1 − tanh(u_j)²)]."""
    mean, log_std = actor.apply(params, obs)
    eps = jax.random.normal(key, mean.shape)
    u = mean + jnp.exp(log_std) * eps
    log_normal = -0.5 * eps ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
    log_det = 2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u))
    return jnp.tanh(u), jnp.sum(log_normal - log_det, axis=-1)


# ---------------------------------------------------------------------------------------------
# The regulariser
# ---------------------------------------------------------------------------------------------

def action_gradient(critic: TwinCritic, params, obs, actions):
    """∇_a Q_θi(s_b, a_b) for both critics and every sample: (2, B, |A|). One forward pass (jax.vjp),
    then one pullback per critic (vmapped), with cotangent 1 on every sample of that critic and 0 on the
    other: Q_i(s_b, a_b) depends on no other sample's action, so ∇_{a_b} Σ_b' Q_i = ∇_a Q_i(s_b, a_b).
    Differentiable in θ."""
    q, vjp = jax.vjp(lambda a: critic.apply(params, obs, a), actions)
    (grads,) = jax.vmap(vjp)(jnp.eye(2)[:, :, None] * jnp.ones_like(q)[None])
    return grads


def cosine(u, v):
    """Mean cosine between the last-axis vectors of u and v (broadcast), 0 where either is 0."""
    dot = jnp.sum(u * v, -1)
    norms = jnp.linalg.norm(u, axis=-1) * jnp.linalg.norm(v, axis=-1)
    return jnp.mean(jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1.0), 0.0))


def score_matching_loss(grad_q, scale, eps):
    """L^SM = Σ_i mean_b ‖∇_a Q_i(s_b, a_b) − α_ψ(s_b) ε_ω(s_b, a_b, w, 1)‖².
    grad_q (2, B, |A|), scale α_ψ(s) (B,), eps (B, |A|)."""
    return jnp.sum(jnp.mean(jnp.sum((grad_q - scale[None, :, None] * eps[None]) ** 2, -1), -1))


# ---------------------------------------------------------------------------------------------
# Train state, optimisers and the updates
# ---------------------------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
    actor_params: dict
    critic_params: dict
    target_critic_params: dict
    target_actor_params: dict  # TD3's target actor (set from the actor when the online phase starts)
    scale_params: dict  # α_ψ
    score_params: dict  # ε_ω
    log_alpha: jax.Array
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    alpha_opt: optax.OptState
    score_opt: optax.OptState
    score_updates: jax.Array  # updates of ε_ω done so far (a resumed run continues them)
    key: jax.Array
    buffer: common.ReplayBuffer | None = None  # the online phase's transitions


@dataclasses.dataclass(frozen=True)
class Agent:
    """Networks, optimisers and hyper-parameters: the static parts, closed over by jit."""

    actor: Actor
    critic: TwinCritic
    scale: ScoreScale
    noise_model: NoiseModel
    actor_tx: optax.GradientTransformation
    critic_tx: optax.GradientTransformation  # critics and α_ψ together
    alpha_tx: optax.GradientTransformation
    score_tx: optax.GradientTransformation
    alpha_bar: tuple[float, ...]
    args: Args
    action_dim: int
    target_entropy: float


def make_optimizer(args: Args, lr: float) -> optax.GradientTransformation:
    """Muon on every 2-D kernel but the output layers' (the input layer's included; with --muon-output-layers
    the output kernels too); on the rest (output layers, biases, LayerNorm scales) optax's Adam branch of
    Muon, which follows Muon's Nesterov switch (b1 = 0.9), i.e. NAdam. `--optimizer adam`: plain Adam everywhere."""
    if args.optimizer == "adam":
        return optax.adam(lr)

    def dims(params):
        def spec(path, x):
            names = [getattr(p, "key", "") for p in path]
            muon = x.ndim == 2 and names[-1] == "kernel" and (args.muon_output_layers or "out" not in names)
            return optax.contrib.MuonDimensionNumbers() if muon else None
        return jax.tree_util.tree_map_with_path(spec, params)

    return optax.contrib.muon(lr, muon_weight_dimension_numbers=dims, consistent_rms=args.muon_rms)


def create_state(key, agent: Agent, obs_dim: int) -> TrainState:
    key, k_actor, k_critic, k_scale, k_score = jax.random.split(key, 5)
    obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, agent.action_dim))
    actor_params = agent.actor.init(k_actor, obs)
    critic_params = agent.critic.init(k_critic, obs, act)
    scale_params = agent.scale.init(k_scale, obs)
    score_params = agent.noise_model.init(k_score, obs, act, jnp.zeros(1), jnp.ones(1, jnp.int32))
    log_alpha = jnp.log(jnp.asarray(agent.args.alpha or 1.0, jnp.float32))
    return TrainState(
        actor_params=actor_params, critic_params=critic_params,
        target_critic_params=jax.tree.map(jnp.copy, critic_params),  # equal values, own buffers (donation)
        target_actor_params=jax.tree.map(jnp.copy, actor_params), scale_params=scale_params,
        score_params=score_params, log_alpha=log_alpha, actor_opt=agent.actor_tx.init(actor_params),
        critic_opt=agent.critic_tx.init((critic_params, scale_params)), alpha_opt=agent.alpha_tx.init(log_alpha),
        score_opt=agent.score_tx.init(score_params), score_updates=jnp.zeros((), jnp.int32), key=key)


def apply_tx(tx, grads, opt, params):
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt


def score_update(state: TrainState, batch, agent: Agent):
    """One Adam step of the diffusion model on the data's (s, a, w)."""
    key, k_loss = jax.random.split(state.key)
    w = batch["w"] if agent.args.score_condition else jnp.zeros_like(batch["w"])
    loss, grads = jax.value_and_grad(lambda p: diffusion_loss(
        agent.noise_model, p, jnp.asarray(agent.alpha_bar), batch["observations"], batch["actions"], w, k_loss))(
        state.score_params)
    score_params, score_opt = apply_tx(agent.score_tx, grads, state.score_opt, state.score_params)
    return state.replace(score_params=score_params, score_opt=score_opt, score_updates=state.score_updates + 1,
                         key=key), {"score_loss": loss}


def sac_update(state: TrainState, batch, agent: Agent, kappa: float):
    """One SAC update with the SMAC regulariser (κ > 0) in the critic loss: critics and α_ψ, then
    the actor against the new critics, then α, then the targets. κ = 0 is plain SAC."""
    a = agent.args
    key, k_next, k_pi, k_sm, k_uniform = jax.random.split(state.key, 5)
    obs, B = batch["observations"], batch["rewards"].shape[0]
    alpha = jnp.exp(state.log_alpha)

    next_a, next_logp = sample_action(agent.actor, state.actor_params, batch["next_observations"], k_next)
    next_q = agent.critic.apply(state.target_critic_params, batch["next_observations"], next_a).min(0)
    y = batch["rewards"] + a.gamma * (1.0 - batch["terminals"]) * (next_q - alpha * next_logp)

    if kappa > 0:  # the regulariser's actions B(A): half ã ~ π(·|s), half uniform; constants for θ and ψ
        half = B // 2
        policy_a, _ = sample_action(agent.actor, state.actor_params, obs[:half], k_sm)
        uniform_a = jax.random.uniform(k_uniform, (B - half, agent.action_dim), minval=-1.0, maxval=1.0)
        sm_actions = jnp.concatenate([policy_a, uniform_a])
        w = jnp.full((B,), a.score_w if a.score_condition else 0.0)  # unconditioned models were trained at w = 0
        sm_eps = agent.noise_model.apply(state.score_params, obs, sm_actions, w, jnp.ones((B,), jnp.int32))

    def critic_loss(params):
        critic_params, scale_params = params
        q = agent.critic.apply(critic_params, obs, batch["actions"])
        td = jnp.sum(jnp.mean((q - y) ** 2, axis=1))
        if kappa == 0:
            return td, (q, td, jnp.zeros(()), jnp.zeros(B), jnp.zeros((2, B, agent.action_dim)))
        scale = agent.scale.apply(scale_params, obs)
        grad_q = action_gradient(agent.critic, critic_params, obs, sm_actions)
        sm = score_matching_loss(grad_q, scale, sm_eps)
        return td + kappa * sm, (q, td, sm, scale, grad_q)

    (q_loss, (q, td, sm, scale, grad_q)), grads = jax.value_and_grad(critic_loss, has_aux=True)(
        (state.critic_params, state.scale_params))
    # α_ψ shares the critics' optimiser; online (κ = 0) its gradient is 0 but its stale momentum still moves
    # it. It is never read online, so nothing learned changes; sm_loss, score_scale(_positive), grad_q_norm
    # and sm_cosine are then logged as placeholder zeros.
    (critic_params, scale_params), critic_opt = apply_tx(agent.critic_tx, grads, state.critic_opt,
                                                         (state.critic_params, state.scale_params))

    def actor_loss(params):
        act, logp = sample_action(agent.actor, params, obs, k_pi)
        return jnp.mean(alpha * logp - agent.critic.apply(critic_params, obs, act).min(0)), logp

    (pi_loss, logp), grads = jax.value_and_grad(actor_loss, has_aux=True)(state.actor_params)
    actor_params, actor_opt = apply_tx(agent.actor_tx, grads, state.actor_opt, state.actor_params)
    alpha_grad = jax.grad(lambda la: -jnp.mean(jnp.exp(la) * jax.lax.stop_gradient(logp + agent.target_entropy)))(
        state.log_alpha)
    log_alpha, alpha_opt = state.log_alpha, state.alpha_opt
    if a.alpha is None:  # a fixed --alpha is never updated
        log_alpha, alpha_opt = apply_tx(agent.alpha_tx, alpha_grad, state.alpha_opt, state.log_alpha)

    state = state.replace(
        actor_params=actor_params, critic_params=critic_params, scale_params=scale_params, log_alpha=log_alpha,
        target_critic_params=optax.incremental_update(critic_params, state.target_critic_params, a.polyak),
        actor_opt=actor_opt, critic_opt=critic_opt, alpha_opt=alpha_opt, key=key)
    metrics = {"critic_loss": q_loss, "td_loss": td, "sm_loss": sm, "score_scale": scale.mean(),
               "score_scale_positive": jnp.mean(scale > 0), "actor_loss": pi_loss,
               "alpha": alpha, "q_mean": q.mean(), "entropy": -logp.mean(),
               # what the regulariser does to ∇_a Q (0 at κ = 0, where ε_ω is not read): its size, and its
               # alignment with the data's score direction −ε_ω, cos(∇_a Q, −ε_ω)
               "grad_q_norm": jnp.linalg.norm(grad_q, axis=-1).mean(),
               "sm_cosine": cosine(grad_q, -sm_eps[None]) if kappa > 0 else jnp.zeros(())}
    return state, metrics


def td3_update(state: TrainState, batch, t, agent: Agent):
    """One TD3 update (online only): critics against the smoothed target policy every step; the
    deterministic actor tanh(μ(s)) and both targets every `td3_policy_delay` steps:

        y = r + γ (1 − d) min_i Q_θ̄i(s', clip(tanh(μ̄(s')) + clip(N(0, σ²), −c, c), −1, 1))
        L_π = −E_s Q_θ1(s, tanh(μ(s)))   (the first critic alone, as TD3)"""
    a = agent.args
    key, k_noise = jax.random.split(state.key)
    obs = batch["observations"]
    target_mean, _ = agent.actor.apply(state.target_actor_params, batch["next_observations"])
    noise = jnp.clip(a.td3_policy_noise * jax.random.normal(k_noise, target_mean.shape),
                     -a.td3_noise_clip, a.td3_noise_clip)
    next_a = jnp.clip(jnp.tanh(target_mean) + noise, -1.0, 1.0)
    next_q = agent.critic.apply(state.target_critic_params, batch["next_observations"], next_a).min(0)
    y = batch["rewards"] + a.gamma * (1.0 - batch["terminals"]) * next_q

    def critic_loss(params):
        q = agent.critic.apply(params[0], obs, batch["actions"])
        return jnp.sum(jnp.mean((q - y) ** 2, axis=1)), q

    # α_ψ rides along with a zero gradient: critic_opt is the optimiser state of the pair (critics, α_ψ)
    (q_loss, q), grads = jax.value_and_grad(critic_loss, has_aux=True)((state.critic_params, state.scale_params))
    (critic_params, scale_params), critic_opt = apply_tx(agent.critic_tx, grads, state.critic_opt,
                                                         (state.critic_params, state.scale_params))
    state = state.replace(critic_params=critic_params, scale_params=scale_params, critic_opt=critic_opt, key=key)

    def actor_step(state):
        def actor_loss(params):
            action = jnp.tanh(agent.actor.apply(params, obs)[0])
            return -jnp.mean(agent.critic.apply(state.critic_params, obs, action)[0])

        pi_loss, grads = jax.value_and_grad(actor_loss)(state.actor_params)
        actor_params, actor_opt = apply_tx(agent.actor_tx, grads, state.actor_opt, state.actor_params)
        return state.replace(
            actor_params=actor_params, actor_opt=actor_opt,
            target_actor_params=optax.incremental_update(actor_params, state.target_actor_params, a.polyak),
            target_critic_params=optax.incremental_update(state.critic_params, state.target_critic_params,
                                                          a.polyak)), pi_loss

    # t is shared by all seeds (not vmapped), so this stays a real branch under vmap
    state, pi_loss = jax.lax.cond(t % a.td3_policy_delay == 0, actor_step, lambda s: (s, jnp.zeros(())), state)
    # logged x delay on actor steps, 0 between: an evaluation interval's mean is then the actor steps' mean
    return state, {"critic_loss": q_loss, "actor_loss": pi_loss * a.td3_policy_delay, "q_mean": q.mean()}


def score_chunk(state: TrainState, data, agent: Agent, num_updates: int):
    """`num_updates` diffusion-model updates fused in one lax.scan. ε_ω draws from its own stream,
    fold_in(key, updates done), and hands the agent's key back untouched: a run that trains ε_ω and
    one that loads it with --score-from then go on to the very same offline run."""
    key = state.key

    def body(state, _):
        k_batch, k_update = jax.random.split(jax.random.fold_in(key, state.score_updates))
        return score_update(state.replace(key=k_update), common.sample_batch(k_batch, data, agent.args.batch_size),
                            agent)

    state, metrics = jax.lax.scan(body, state, None, length=num_updates)
    return state.replace(key=key), metrics


def train_chunk(state: TrainState, data, agent: Agent, num_updates: int):
    """`num_updates` offline SMAC updates fused in one lax.scan; batches sampled on the device."""

    def body(state, _):
        key, k_batch = jax.random.split(state.key)
        batch = common.sample_batch(k_batch, data, agent.args.batch_size)
        return sac_update(state.replace(key=key), batch, agent, agent.args.kappa)

    return jax.lax.scan(body, state, None, length=num_updates)


# ---------------------------------------------------------------------------------------------
# Online: one environment step, then --online-utd SAC or TD3 updates
# ---------------------------------------------------------------------------------------------

def act(state: TrainState, obs, agent: Agent):
    """SAC: ã ~ π(·|s); TD3: tanh(μ(s)) + N(0, σ²), clipped to the box."""
    key, k = jax.random.split(state.key)
    if agent.args.online_algo == "sac":
        action, _ = sample_action(agent.actor, state.actor_params, obs[None], k)
        return state.replace(key=key), action[0]
    mean, _ = agent.actor.apply(state.actor_params, obs)
    noise = agent.args.td3_exploration_noise * jax.random.normal(k, mean.shape)
    return state.replace(key=key), jnp.clip(jnp.tanh(mean) + noise, -1.0, 1.0)


def online_step(state: TrainState, transition, next_obs, t, offline, agent: Agent):
    """Store the transition, `--online-utd` updates on mixed batches, act at s'."""
    state = state.replace(buffer=state.buffer.add(jax.tree.map(lambda x: x[None], transition)))
    utd = agent.args.online_utd

    def one_update(state, i):
        key, k_batch = jax.random.split(state.key)
        batch = common.sample_mixed(k_batch, offline, state.buffer, agent.args.batch_size, agent.args.mixing_ratio)
        state = state.replace(key=key)
        if agent.args.online_algo == "sac":
            return sac_update(state, batch, agent, kappa=0.0)
        return td3_update(state, batch, t * utd + i, agent)  # the update count sets TD3's policy delay

    state, metrics = jax.lax.scan(one_update, state, jnp.arange(utd))
    state, action = act(state, next_obs, agent)
    return state, action, jax.tree.map(lambda x: x.mean(0), metrics)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def trajectory_return_signal(dataset: common.Dataset) -> np.ndarray:
    """w per transition: the return of its trajectory, min–max normalised to [0, 1] over the dataset."""
    returns = dataset.episode_returns()
    ends = np.flatnonzero(dataset.episode_ends)
    if len(ends) == 0 or ends[-1] != len(dataset) - 1:
        ends = np.append(ends, len(dataset) - 1)
    lengths = np.diff(np.r_[-1, ends])
    w = (returns - returns.min()) / max(returns.max() - returns.min(), 1e-8)
    return np.repeat(w, lengths).astype(np.float32)


SCORE_SETTINGS = ("dataset", "seed", "num_seeds", "score_steps", "diffusion_steps", "score_hidden", "score_blocks",
                  "score_lr", "score_condition", "batch_size")


def load_score_model(args: Args, template):
    """ε_ω's parameters (per seed) from the run folder `args.score_from`, which must have trained it
    with the same settings; the model is saved there as score_model.npz once trained."""
    src = Path(args.score_from)
    if not (src / "score_model.npz").exists() or not (src / "config.json").exists():
        raise SystemExit(f"--score-from {src}: no score_model.npz and config.json there; give the folder of a "
                         f"SMAC run whose score model finished training")
    config = json.loads((src / "config.json").read_text())["args"]
    differ = [f"{k}: {config.get(k)!r} there, {getattr(args, k)!r} here" for k in SCORE_SETTINGS
              if config.get(k) != getattr(args, k)]
    if differ:
        raise SystemExit(f"--score-from {src} trained its score model with other settings ({'; '.join(differ)}); "
                         f"use the same ones or train a new model")
    params, _, _ = common.load_checkpoint(src / "score_model.npz", template)
    return params


# what a fine-tuning may set apart from its pre-training (--offline-from): the online phase and bookkeeping
ONLINE_OR_BOOKKEEPING = ("online_steps", "online_algo", "mixing_ratio", "online_utd", "td3_exploration_noise",
                         "td3_policy_noise", "td3_noise_clip", "td3_policy_delay", "checkpoint_every",
                         "runs_dir", "resume", "wandb", "score_from", "offline_from")


def check_offline_source(args: Args) -> None:
    """`--offline-from` must name a SMAC run whose offline phase finished with the settings given here."""
    src = Path(args.offline_from)
    if not (src / "config.json").exists() or not (src / "checkpoint.npz").exists():
        raise SystemExit(f"--offline-from {src}: no config.json and checkpoint.npz there; give the folder of a "
                         f"SMAC run made with --online-steps 0")
    config = json.loads((src / "config.json").read_text())
    saved = config["args"]
    if config.get("algo") != "smac" or saved.get("online_steps"):
        raise SystemExit(f"--offline-from {src}: not an offline-only SMAC run (algo {config.get('algo')!r}, "
                         f"--online-steps {saved.get('online_steps')}); pre-train with --online-steps 0")
    here = json.loads(json.dumps(dataclasses.asdict(args)))  # tuples as JSON lists, like the saved config
    differ = [f"{k}: {saved.get(k)!r} there, {v!r} here" for k, v in here.items()
              if k not in ONLINE_OR_BOOKKEEPING and saved.get(k) != v]
    if differ:
        raise SystemExit(f"--offline-from {src} was pre-trained with other offline settings ({'; '.join(differ)}); "
                         f"give the same ones (only the online settings may differ)")
    with np.load(src / "checkpoint.npz") as f:
        step = int(f["step"])
    if step != args.total_steps:
        raise SystemExit(f"--offline-from {src}: its checkpoint is at update {step:,} of {args.total_steps:,}; "
                         f"finish its offline phase first (python -m algorithms.smac --resume {src})")


def make_agent(args: Args, obs_dim: int, act_dim: int) -> Agent:
    return Agent(actor=Actor(args.hidden, act_dim), critic=TwinCritic(args.hidden, args.critic_layernorm),
                 scale=ScoreScale(args.hidden, args.scale_sign == "negative"),
                 noise_model=NoiseModel(act_dim, args.score_hidden, args.score_blocks),
                 actor_tx=make_optimizer(args, args.actor_lr), critic_tx=make_optimizer(args, args.critic_lr),
                 alpha_tx=optax.adam(args.alpha_lr), score_tx=optax.adam(args.score_lr),
                 alpha_bar=tuple(np.asarray(vp_schedule(args.diffusion_steps)).tolist()), args=args,
                 action_dim=act_dim,
                 target_entropy=-float(act_dim) if args.target_entropy is None else args.target_entropy)


def main(args: Args) -> dict:
    args = common.resume_args(args)
    check_args(args)
    dataset = common.load_dataset(args.dataset)
    w = trajectory_return_signal(dataset)  # the RvS signal of the score model, per transition
    data = common.device_arrays(dataset, extra={"w": w})
    obs_dim, act_dim = dataset.observations.shape[1], dataset.actions.shape[1]

    agent = make_agent(args, obs_dim, act_dim)
    state = jax.vmap(lambda k: create_state(k, agent, obs_dim))(common.seed_keys(args.seed, args.num_seeds))

    def online_state(state):  # online buffer; TD3's target actor starts as the offline actor
        row = {k: data[k][0] for k in common.TRANSITION_KEYS}
        buffer = common.stack_seeds(common.ReplayBuffer.create(row, args.online_steps), args.num_seeds)
        return state.replace(buffer=buffer, target_actor_params=jax.tree.map(jnp.copy, state.actor_params))

    if args.offline_from and not args.resume:
        check_offline_source(args)
    run = common.Run("smac", args, args.total_steps + args.online_steps,
                     (dataset.ref_min_score, dataset.ref_max_score))
    if run.checkpoint_step() > args.total_steps:  # an online checkpoint holds the buffer: the template needs one
        state = online_state(state)
    state, start = run.restore(state, branch_from=args.offline_from)

    # 1. the behaviour score model, trained first (checkpointed in pieces, so a resume continues it);
    # at κ = 0 it is never read, and --score-from takes a trained one from another run
    done = int(state.score_updates[0])
    score_steps = args.score_steps if args.kappa > 0 else 0
    if args.score_from and done < score_steps:
        state = state.replace(score_params=load_score_model(args, state.score_params),
                              score_updates=jnp.full_like(state.score_updates, score_steps))
        done = score_steps
        (run.dir / "score_model.json").write_text(json.dumps({"updates": done, "from": args.score_from}))
        common.save_checkpoint(run.dir / "score_model.npz", state.score_params, done)
    if done < score_steps:
        piece = min(args.eval_every * 2, score_steps)
        pieces = {n: jax.jit(jax.vmap(partial(score_chunk, agent=agent, num_updates=n), in_axes=(0, None)),
                             donate_argnums=0) for n in {piece, (score_steps - done) % piece} if n}
        losses = []
        while done < score_steps:
            n = min(piece, score_steps - done)
            state, metrics = pieces[n](state, data)
            done += n
            losses.append(float(np.mean(metrics["score_loss"][:, -min(n, 1000):])))
            print(f"score model: {done:,}/{score_steps:,} updates, ε-loss {losses[-1]:.4f}", flush=True)
            run.check(0, {"score_loss": metrics["score_loss"]})
            run.save(state, 0)
        (run.dir / "score_model.json").write_text(json.dumps({"updates": done, "loss_per_piece": losses}))
        common.save_checkpoint(run.dir / "score_model.npz", state.score_params, done)  # for --score-from

    # 2. offline SMAC, then 3. online SAC or TD3
    evaluator = common.Evaluator(dataset.make_env, run.seeds, args.eval_episodes,
                                 policy=lambda params, obs: jnp.tanh(agent.actor.apply(params, obs)[0]))
    q1 = MLP(args.hidden, 1, args.critic_layernorm)
    seem = common.SeemMonitor(args.seem_every, data, lambda p, s, a: q1.apply(p, jnp.concatenate([s, a], -1))[:, 0],
                              args.gamma)
    mean_action = jax.jit(lambda params, obs: jnp.tanh(agent.actor.apply(params, obs)[0]))

    def evaluate(state, step):
        returns = evaluator(state.actor_params, step)
        if step > args.total_steps:
            return returns
        # SEEM of Q_θ1 alone: P in Φ's 1/√P counts its parameters only
        return returns, seem(step, {"params": state.critic_params["params"]["q1"]},
                             lambda i, s: mean_action(common.tree_index(state.actor_params, i), s))

    chunk = jax.jit(jax.vmap(partial(train_chunk, agent=agent, num_updates=args.eval_every), in_axes=(0, None)),
                    donate_argnums=0)
    state = common.train_offline(run, state, chunk, data, evaluate, start=start, total=args.total_steps,
                                 eval_every=args.eval_every)
    if args.online_steps:
        if state.buffer is None:
            state = online_state(state)
        step_fn = jax.jit(jax.vmap(partial(online_step, agent=agent), in_axes=(0, 0, 0, None, None)),
                          donate_argnums=0)
        common.train_online(run, state, common.vector_env(dataset.make_env, args.num_seeds), step_fn,
                            jax.jit(jax.vmap(partial(act, agent=agent))), evaluate,
                            start=max(start, args.total_steps), total=args.total_steps + args.online_steps,
                            eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                            env_offset=args.total_steps, step_args=(data,))
    return run.finish()


if __name__ == "__main__":
    common.cli(main, Args)
