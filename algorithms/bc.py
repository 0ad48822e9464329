"""Behaviour cloning (BC): the baseline every offline method must beat, and the house template.

A deterministic policy π_θ regresses the dataset's actions:

    L(θ) = E_{(s,a)~D} ‖π_θ(s) − a‖²        (actions in [-1, 1], π_θ(s) = tanh(MLP_θ(s)))

Defaults (256x256 ReLU MLP, Adam 3e-4, batch 256, normalised observations, 1M updates, 10
evaluation episodes every 5,000 updates) are the usual BC baseline of the offline-RL literature
(e.g. TD3+BC's and IQL's tables). BC reproduces the behaviour policy's return: on a medium dataset
it scores about what the data scores.

Run: python -m algorithms.bc --dataset offlax/hopper/medium-v0 --num-seeds 3
"""

from __future__ import annotations

import dataclasses
from functools import partial

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
    dataset: str = "offlax/hopper/medium-v0"
    """Minari dataset id: local, remote (downloaded when online) or offlax/<env>/<quality>-v0 (built on first use)."""
    seed: int = 0
    """Seed of the first run; seed i of --num-seeds is seed + i."""
    num_seeds: int = 1
    """Independent seeds trained at once in one process (jax.vmap); equal to separate runs."""
    total_steps: int = 1_000_000
    """Gradient updates per seed."""
    eval_every: int = 5_000
    """Updates between evaluations; also the length of one fused lax.scan chunk."""
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
    # --- algorithm ---
    batch_size: int = 256
    """Transitions per update, sampled uniformly on the device."""
    lr: float = 3e-4
    """Adam learning rate."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer widths of the policy MLP."""
    normalize_obs: bool = True
    """Standardise observations with the dataset's mean and std (std + 1e-3, as TD3+BC)."""


def check_args(args: Args) -> None:
    common.check_run_args(args)
    if not args.lr > 0:
        raise SystemExit(f"--lr must be positive, got {args.lr}")


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------

class Actor(nn.Module):
    """Deterministic policy: s -> tanh(MLP(s)) in [-1, 1]^|A|."""

    hidden: tuple[int, ...]
    action_dim: int

    @nn.compact
    def __call__(self, obs):
        x = obs
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return jnp.tanh(nn.Dense(self.action_dim)(x))


# ---------------------------------------------------------------------------------------------
# Train state and the update
# ---------------------------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
    params: dict
    opt_state: optax.OptState
    key: jax.Array


def create_state(key, actor: Actor, tx, obs_dim: int) -> TrainState:
    key, init_key = jax.random.split(key)
    params = actor.init(init_key, jnp.zeros((1, obs_dim)))
    return TrainState(params=params, opt_state=tx.init(params), key=key)


def bc_loss(params, actor: Actor, batch):
    """Mean over the batch of ‖π_θ(s) − a‖² (squared error summed over action dimensions)."""
    pred = actor.apply(params, batch["observations"])
    return jnp.mean(jnp.sum((pred - batch["actions"]) ** 2, axis=-1))


def update(state: TrainState, batch, actor: Actor, tx):
    """One gradient step on a batch: a pure function of (state, batch)."""
    loss, grads = jax.value_and_grad(bc_loss)(state.params, actor, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(params=params, opt_state=opt_state), {"bc_loss": loss}


def train_chunk(state: TrainState, data, actor: Actor, tx, args: Args):
    """`eval_every` updates fused in one lax.scan; batches are sampled on the device."""

    def step(state, _):
        key, batch_key = jax.random.split(state.key)
        batch = common.sample_batch(batch_key, data, args.batch_size)
        return update(state.replace(key=key), batch, actor, tx)

    return jax.lax.scan(step, state, None, length=args.eval_every)


# ---------------------------------------------------------------------------------------------
# Main: data, state for all seeds, chunks, evaluation, logging, checkpoints
# ---------------------------------------------------------------------------------------------

def main(args: Args) -> dict:
    args = common.resume_args(args)
    check_args(args)
    dataset = common.load_dataset(args.dataset)
    obs_dim, act_dim = dataset.observations.shape[1], dataset.actions.shape[1]
    if args.normalize_obs:
        obs_mean, obs_std = common.obs_stats(dataset)
    else:
        obs_mean, obs_std = np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32)
    data = common.device_arrays(dataset, obs_mean, obs_std)

    actor = Actor(args.hidden, act_dim)
    tx = optax.adam(args.lr)
    keys = common.seed_keys(args.seed, args.num_seeds)
    state = jax.vmap(lambda k: create_state(k, actor, tx, obs_dim))(keys)

    run = common.Run("bc", args, args.total_steps, (dataset.ref_min_score, dataset.ref_max_score))
    state, start = run.restore(state)
    chunk = jax.jit(jax.vmap(partial(train_chunk, actor=actor, tx=tx, args=args), in_axes=(0, None)),
                    donate_argnums=0)
    mean, std = jnp.asarray(obs_mean), jnp.asarray(obs_std)
    evaluate = common.Evaluator(dataset.make_env, run.seeds, args.eval_episodes,
                                policy=lambda params, obs: actor.apply(params, (obs - mean) / std))
    common.train_offline(run, state, chunk, data, lambda state, step: evaluate(state.params, step),
                         start=start, total=args.total_steps, eval_every=args.eval_every)
    return run.finish()


if __name__ == "__main__":
    common.cli(main, Args)
