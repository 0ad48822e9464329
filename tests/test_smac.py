"""SMAC: the action-gradient, the regulariser by hand, the diffusion model's score on a known
Gaussian behaviour policy, the Muon split, and offline + online (SAC and TD3) smoke runs."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import q1_param_count

from algorithms import smac


def _float64(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def test_action_gradient_and_its_theta_derivative_match_finite_differences():
    """∇_a Q from `action_gradient` and d/dθ of the regulariser (second order) against central
    differences, in float64 so that the differences are exact to ~1e-8."""
    with jax.enable_x64(True):
        critic = smac.TwinCritic((16, 16))
        key = jax.random.PRNGKey(0)
        obs = jax.random.normal(key, (5, 3), jnp.float64)
        act = jax.random.uniform(jax.random.PRNGKey(1), (5, 2), jnp.float64, -1, 1)
        params = _float64(critic.init(key, obs[:1].astype(jnp.float32), act[:1].astype(jnp.float32)))
        grads = smac.action_gradient(critic, params, obs, act)
        assert grads.shape == (2, 5, 2)
        h = 1e-6
        for j in range(2):
            e = jnp.zeros(2).at[j].set(h)
            fd = (critic.apply(params, obs, act + e) - critic.apply(params, obs, act - e)) / (2 * h)  # (2, B)
            np.testing.assert_allclose(grads[..., j], fd, rtol=1e-6, atol=1e-8)

        # the regulariser's gradient in θ (through ∇_a Q) along a random direction
        eps = jax.random.normal(jax.random.PRNGKey(2), (5, 2), jnp.float64)
        scale = jnp.linspace(-1.0, 1.0, 5)

        def loss(p):
            return smac.score_matching_loss(smac.action_gradient(critic, p, obs, act), scale, eps)

        leaves, treedef = jax.tree.flatten(params)
        direction = jax.tree.unflatten(treedef, [jax.random.normal(jax.random.PRNGKey(3 + i), x.shape, jnp.float64)
                                                 for i, x in enumerate(leaves)])
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(jax.grad(loss)(params)),
                                                        jax.tree.leaves(direction)))
        shift = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)  # noqa: E731
        numeric = (loss(shift(1e-6)) - loss(shift(-1e-6))) / 2e-6
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5)


def test_score_matching_loss_by_hand():
    # 2 critics, 2 samples, |A| = 2
    grad_q = jnp.array([[[1.0, 2.0], [0.0, -1.0]],
                        [[3.0, 0.0], [1.0, 1.0]]])
    scale = jnp.array([2.0, -1.0])
    eps = jnp.array([[0.5, 1.0], [1.0, 0.0]])
    # α ε: sample 0 -> (1, 2); sample 1 -> (-1, 0)
    # critic 1: ‖(0, 0)‖² = 0, ‖(1, −1)‖² = 2 -> mean 1;  critic 2: ‖(2, −2)‖² = 8, ‖(2, 1)‖² = 5 -> mean 6.5
    assert float(smac.score_matching_loss(grad_q, scale, eps)) == pytest.approx(7.5)


def test_diffusion_model_recovers_the_score_of_a_gaussian_behaviour_policy():
    """Behaviour a = μ(s) + σ n, μ(s) = 0.5 s, σ = 0.2. At the first noise step the model's score
    −ε_ω/√(1 − ᾱ_1) must match the analytic score of the k = 1 marginal, a Gaussian with mean
    √ᾱ_1 μ and variance ᾱ_1 σ² + 1 − ᾱ_1 (the behaviour score −(a − μ)/σ², smoothed by the first
    step's noise, which vanishes as ᾱ_1 → 1)."""
    sigma, T = 0.2, 5
    model = smac.NoiseModel(action_dim=1, hidden=64, blocks=2)
    alpha_bar = smac.vp_schedule(T)
    tx = optax.adam(1e-3)
    key = jax.random.PRNGKey(0)
    params = model.init(key, jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.zeros(1), jnp.ones(1, jnp.int32))
    opt = tx.init(params)

    @jax.jit
    def train(params, opt, key):
        def body(carry, key):
            params, opt = carry
            k_s, k_n, k_loss = jax.random.split(key, 3)
            s = jax.random.uniform(k_s, (512, 1), minval=-1, maxval=1)
            a = 0.5 * s + sigma * jax.random.normal(k_n, s.shape)
            loss, g = jax.value_and_grad(smac.diffusion_loss, argnums=1)(model, params, alpha_bar, s, a,
                                                                         jnp.zeros(512), k_loss)
            updates, opt = tx.update(g, opt)
            return (optax.apply_updates(params, updates), opt), loss
        return jax.lax.scan(body, (params, opt), jax.random.split(key, 2000))

    (params, _), losses = train(params, opt, key)
    s = jnp.repeat(jnp.array([-0.6, 0.0, 0.6]), 5)[:, None]
    mu = 0.5 * s
    ab1 = float(alpha_bar[0])
    a = jnp.sqrt(ab1) * mu + jnp.tile(jnp.array([-0.4, -0.2, 0.0, 0.2, 0.4]), 3)[:, None]
    model_score = smac.behaviour_score(model, params, alpha_bar, s, a, jnp.zeros(15))
    exact = -(a - jnp.sqrt(ab1) * mu) / (ab1 * sigma ** 2 + 1 - ab1)
    # within 10% of the score's range over the test points (the score spans about ±1.8 here)
    err = float(jnp.max(jnp.abs(model_score - exact)))
    assert err < 0.1 * float(jnp.max(jnp.abs(exact))), (err, np.c_[model_score, exact])
    # and the direction of the behaviour score itself: pointing back to μ(s)
    assert np.all(np.sign(np.asarray(model_score))[np.abs(np.asarray(a - mu)) > 0.15]
                  == -np.sign(np.asarray(a - mu))[np.abs(np.asarray(a - mu)) > 0.15])


def test_muon_on_hidden_kernels_adam_elsewhere():
    args = smac.Args(optimizer="muon")
    critic = smac.TwinCritic((8, 8))
    params = critic.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)), jnp.zeros((1, 2)))
    tx = smac.make_optimizer(args, 1e-3)
    state = tx.init(params)
    leaves, treedef = jax.tree.flatten(params)
    grads = jax.tree.unflatten(treedef, [jax.random.normal(jax.random.PRNGKey(i), x.shape)
                                         for i, x in enumerate(leaves)])
    updates, _ = tx.update(grads, state, params)
    # Muon: the hidden kernel's step is orthogonalised (singular values all about equal), which
    # an elementwise step of a random gradient is not; Adam's first step on the output layer and
    # the biases is elementwise: every entry has the same magnitude
    sv = np.linalg.svd(np.asarray(updates["params"]["q1"]["Dense_1"]["kernel"]), compute_uv=False)
    assert sv.max() / sv.min() < 2.0, sv
    sv_adam = np.linalg.svd(np.sign(np.asarray(grads["params"]["q1"]["Dense_1"]["kernel"])), compute_uv=False)
    assert sv_adam.max() / sv_adam.min() > 5.0  # the elementwise alternative would fail the check above
    for leaf in (updates["params"]["q1"]["out"]["kernel"], updates["params"]["q1"]["Dense_0"]["bias"]):
        np.testing.assert_allclose(np.abs(leaf), np.abs(leaf).max(), rtol=1e-4)


def _small(**kw):
    return smac.Args(hidden=(32, 32), score_hidden=32, score_blocks=1, batch_size=64, eval_episodes=2, **kw)


@pytest.mark.parametrize("online_algo,optimizer,extra", [
    ("sac", "muon", {}),
    ("td3", "adam", {"online_utd": 2, "scale_sign": "free", "alpha": 0.1}),
])
def test_smac_offline_then_online_smoke(tmp_path, hopper_tiny, online_algo, optimizer, extra):
    summary = smac.main(_small(dataset=hopper_tiny, score_steps=200, total_steps=200, eval_every=100,
                               online_steps=200, online_algo=online_algo, optimizer=optimizer, num_seeds=2,
                               checkpoint_every=100, seem_every=100, runs_dir=str(tmp_path), **extra))
    rows = [json.loads(x) for x in (Path(summary["run"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["offline", "offline", "online", "online"]
    assert all(np.all(np.isfinite(r["critic_loss"])) for r in rows)
    assert rows[0]["sm_loss"][0] > 0  # the regulariser is on offline
    assert rows[0]["grad_q_norm"][0] > 0 and -1 <= rows[0]["sm_cosine"][0] <= 1  # its diagnostics are logged
    assert json.loads((Path(summary["run"]) / "score_model.json").read_text())["updates"] == 200
    assert np.isfinite(summary["last_mean"])
    assert rows[0]["seem_num_params"] == [q1_param_count(11 + 3, (32, 32))] * 2  # Q1's alone
    if "alpha" in extra:  # a fixed temperature stays fixed
        np.testing.assert_allclose(rows[1]["alpha"], [0.1, 0.1], rtol=1e-6)
    else:  # the default α_ψ is negative at every state
        assert max(rows[1]["score_scale"]) < 0 and max(rows[1]["score_scale_positive"]) == 0


def test_cosine_by_hand():
    u = jnp.array([[[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]]])  # (1, 3, 2)
    v = jnp.array([[0.0, 5.0], [-2.0, 0.0], [1.0, 1.0]])  # (3, 2), broadcast over the leading axis
    assert float(smac.cosine(u, v[None])) == pytest.approx((0.8 - 1.0 + 0.0) / 3)  # a zero vector counts 0


def test_score_scale_sign():
    obs = jax.random.normal(jax.random.PRNGKey(1), (64, 5)) * 3
    for negative in (True, False):
        scale = smac.ScoreScale((16,), negative)
        out = scale.apply(scale.init(jax.random.PRNGKey(0), obs), obs)
        if negative:
            assert float(out.max()) < 0
        else:
            assert float(out.max()) > 0 > float(out.min())  # the free form takes either sign


def test_muon_output_layers_flag():
    critic = smac.TwinCritic((8, 8))
    params = critic.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)), jnp.zeros((1, 2)))
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(3), x.shape), params)
    for flag in (False, True):
        tx = smac.make_optimizer(smac.Args(optimizer="muon", muon_output_layers=flag), 1e-3)
        step = np.abs(np.asarray(tx.update(grads, tx.init(params), params)[0]["params"]["q1"]["out"]["kernel"]))
        # Adam's first step has equal magnitudes; Muon's step on a column is g/‖g‖, which does not
        assert (step.max() / step.min() > 1.5) == flag, step.ravel()


def _rows(run: Path) -> list[dict]:
    """A run's metrics rows without its timings, which differ from run to run."""
    timings = ("updates_per_s", "compile_s", "steps_per_s")
    return [{k: v for k, v in json.loads(x).items() if k not in timings}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_score_model_reused_by_score_from_and_skipped_at_kappa_zero(tmp_path, hopper_tiny):
    kw = dict(dataset=hopper_tiny, score_steps=100, total_steps=100, eval_every=100)
    first = Path(smac.main(_small(runs_dir=str(tmp_path / "a"), **kw))["run"])
    second = Path(smac.main(_small(runs_dir=str(tmp_path / "b"), score_from=str(first), kappa=2.0, **kw))["run"])
    assert json.loads((second / "score_model.json").read_text())["from"] == str(first)
    # ε_ω has its own random stream, so loading it gives the run that trained it, update for update
    reused = Path(smac.main(_small(runs_dir=str(tmp_path / "e"), score_from=str(first), **kw))["run"])
    assert _rows(reused) == _rows(first)
    with np.load(first / "score_model.npz") as a, np.load(second / "score_model.npz") as b:
        assert [k for k in a.files if k.startswith("leaf_")] and all(
            np.array_equal(a[k], b[k]) for k in a.files if k.startswith("leaf_"))
    with pytest.raises(SystemExit, match="other settings .*diffusion_steps"):
        smac.main(_small(runs_dir=str(tmp_path / "c"), score_from=str(first), diffusion_steps=3, **kw))
    no_model = Path(smac.main(_small(runs_dir=str(tmp_path / "d"), kappa=0.0, **kw))["run"])
    assert not (no_model / "score_model.json").exists()  # κ = 0 never reads ε_ω, so never trains it


def test_smac_bad_args(tmp_path, hopper_tiny):
    with pytest.raises(SystemExit, match="kappa"):
        smac.main(_small(dataset=hopper_tiny, kappa=-1.0, runs_dir=str(tmp_path)))
    with pytest.raises(SystemExit, match="--total-steps .* multiple of --eval-every"):
        smac.main(_small(dataset=hopper_tiny, total_steps=150, eval_every=100, runs_dir=str(tmp_path)))


def test_offline_from_continues_a_pre_training_exactly(tmp_path, hopper_tiny):
    """Pre-training once and fine-tuning it with --offline-from gives the very run that trains
    offline and online in one go (TD3 online, the other algorithm than the pre-training's SAC)."""
    kw = dict(dataset=hopper_tiny, score_steps=50, total_steps=100, eval_every=50, checkpoint_every=50)
    one_go = Path(smac.main(_small(runs_dir=str(tmp_path / "a"), online_steps=100, online_algo="td3", **kw))["run"])
    pre = Path(smac.main(_small(runs_dir=str(tmp_path / "b"), **kw))["run"])
    tuned = Path(smac.main(_small(runs_dir=str(tmp_path / "c"), online_steps=100, online_algo="td3",
                                  offline_from=str(pre), **kw))["run"])
    assert [r["phase"] for r in _rows(tuned)] == ["offline", "offline", "online", "online"]
    assert _rows(tuned) == _rows(one_go)
    with pytest.raises(SystemExit, match="other offline settings .*kappa"):
        smac.main(_small(runs_dir=str(tmp_path / "d"), online_steps=100, offline_from=str(pre),
                         **dict(kw, kappa=2.0)))
    with pytest.raises(SystemExit, match="not an offline-only SMAC run"):
        smac.main(_small(runs_dir=str(tmp_path / "d"), online_steps=100, offline_from=str(one_go), **kw))
