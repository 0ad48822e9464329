"""BC: the loss and its gradient by hand; end to end: smoke run, seeds under vmap equal single runs,
resume equals uninterrupted, a learning check, bad arguments, divergence."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common
from algorithms import bc
from conftest import random_batch

TIMING = ("updates_per_s", "compile_s")


def _rows(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _args(tmp_path, dataset, **kw):
    base = dict(dataset=dataset, total_steps=200, eval_every=100, eval_episodes=2, runs_dir=str(tmp_path),
                hidden=(32, 32))
    base.update(kw)
    return bc.Args(**base)


def test_bc_loss_and_gradient_by_hand():
    """L(θ) = mean_b ‖tanh(W s_b + c) − a_b‖² for a one-layer policy, and its gradient in closed form:
    ∂L/∂W = (2/B) Σ_b [(π_b − a_b) ⊙ (1 − π_b²)] s_bᵀ."""
    actor = bc.Actor((), 2)
    batch = random_batch(6)
    params = actor.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))
    layer = params["params"]["Dense_0"]
    layer["bias"] = layer["bias"] + 0.3  # flax starts it at 0: a non-zero bias, so that dropping it shows
    w, c = np.asarray(layer["kernel"], np.float64), np.asarray(layer["bias"], np.float64)
    pi = np.tanh(batch["observations"] @ w + c)
    err = pi - batch["actions"]
    loss, grads = jax.value_and_grad(bc.bc_loss)(params, actor, batch)
    assert float(loss) == pytest.approx(np.mean(np.sum(err ** 2, -1)), rel=1e-5)
    expected = 2.0 / 6 * batch["observations"].T @ (err * (1 - pi ** 2))
    np.testing.assert_allclose(grads["params"]["Dense_0"]["kernel"], expected, rtol=1e-4, atol=1e-6)


def test_bc_smoke(tmp_path, hopper_tiny):
    summary = bc.main(_args(tmp_path, hopper_tiny, num_seeds=2))
    run = Path(summary["run"])
    assert {"config.json", "metrics.jsonl", "checkpoint.npz", "summary.json"} <= {p.name for p in run.iterdir()}
    rows = _rows(run)
    assert [r["step"] for r in rows] == [100, 200]
    assert np.asarray(rows[-1]["returns"]).shape == (2, 2) and len(rows[-1]["score"]) == 2
    assert rows[-1]["bc_loss"][0] < rows[0]["bc_loss"][0]
    assert np.isfinite(summary["last_mean"]) and summary["measure"] == "normalized score"


def test_vmapped_seeds_equal_single_seed_runs(tmp_path, hopper_tiny):
    both = _rows(bc.main(_args(tmp_path / "a", hopper_tiny, seed=3, num_seeds=2))["run"])
    one = _rows(bc.main(_args(tmp_path / "b", hopper_tiny, seed=3))["run"])
    two = _rows(bc.main(_args(tmp_path / "c", hopper_tiny, seed=4))["run"])
    for rb, r1, r2 in zip(both, one, two):
        np.testing.assert_allclose(rb["bc_loss"], r1["bc_loss"] + r2["bc_loss"], rtol=1e-5)
        np.testing.assert_allclose(rb["returns"], r1["returns"] + r2["returns"], rtol=1e-4)


def test_resume_equals_uninterrupted(tmp_path, hopper_tiny, interrupt_after):
    full = _rows(bc.main(_args(tmp_path / "full", hopper_tiny, total_steps=400, num_seeds=2))["run"])
    interrupt_after(200)
    with pytest.raises(KeyboardInterrupt):
        bc.main(_args(tmp_path / "cut", hopper_tiny, total_steps=400, num_seeds=2))
    (run_dir,) = (tmp_path / "cut").iterdir()
    resumed = _rows(bc.main(bc.Args(resume=str(run_dir)))["run"])
    assert [r["step"] for r in resumed] == [100, 200, 300, 400]
    for a, b in zip(full, resumed):
        np.testing.assert_array_equal(a["bc_loss"], b["bc_loss"])
        np.testing.assert_array_equal(a["returns"], b["returns"])


def test_bc_learns_to_balance_the_pendulum(tmp_path, pendulum_dataset):
    """BC on a noisy stabilising controller balances InvertedPendulum-v5 for hundreds of steps;
    uniform random actions last about 5 (measured below on the same evaluation)."""
    import gymnasium as gym

    summary = bc.main(_args(tmp_path, pendulum_dataset, total_steps=3000, eval_every=1000, eval_episodes=5,
                            hidden=(64, 64), last_evals=1))
    env, rng, random_returns = gym.make("InvertedPendulum-v5"), np.random.default_rng(0), []
    for ep in range(5):
        env.reset(seed=ep)
        ret, done = 0.0, False
        while not done:
            _, r, term, trunc, _ = env.step(rng.uniform(-3, 3, size=1).astype(np.float32))
            ret, done = ret + r, term or trunc
        random_returns.append(ret)
    assert np.mean(random_returns) < 30
    assert summary["last_mean"] > 500, summary  # returns (no reference scores for this dataset)


def test_bad_arguments_are_explained(tmp_path, hopper_tiny):
    with pytest.raises(SystemExit, match="multiple of --eval-every"):
        bc.main(_args(tmp_path, hopper_tiny, total_steps=250))
    with pytest.raises(SystemExit, match="--num-seeds must be at least 1"):
        bc.main(_args(tmp_path, hopper_tiny, num_seeds=0))
    with pytest.raises(SystemExit, match="no config.json"):
        bc.main(bc.Args(resume=str(tmp_path / "nowhere")))


def test_a_diverging_run_stops_with_a_message(tmp_path, hopper_tiny):
    with pytest.raises(common.DivergenceError, match=r"bc_loss became nan at update \d+"):
        bc.main(_args(tmp_path, hopper_tiny, lr=1e38))
