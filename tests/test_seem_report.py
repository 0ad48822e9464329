"""benchmarks/seem_report.py: the study's measurements against hand-computed values, and SEEM's
SGD prediction against an actual gradient step."""

import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import common
from algorithms import td3_bc

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("offlax_seem_report", ROOT / "benchmarks" / "seem_report.py")
seem_report = importlib.util.module_from_spec(spec)
sys.modules["offlax_seem_report"] = seem_report
spec.loader.exec_module(seem_report)


def test_first_step_above_and_growth_order():
    steps = np.array([1000, 2000, 3000, 4000])
    values = np.array([[0.0, 5.0], [2.0, 0.0], [3.0, 0.0], [1.0, 0.0]])
    assert seem_report.first_step_above(steps, values, 1.5) == [2000, 1000]
    assert seem_report.first_step_above(steps, values, 10.0) == [None, None]
    t = np.arange(1, 11) * 1000.0
    y = np.stack([7 * t ** 3, 0.1 * t], 1)  # orders 3 and 1
    np.testing.assert_allclose(seem_report.growth_order(t, y), [3.0, 1.0], rtol=1e-9)


def test_num_params_is_td3_bc_q1():
    for layernorm in (False, True):
        mlp = td3_bc.MLP((256, 256), 1, layernorm)
        params = mlp.init(jax.random.PRNGKey(0), jnp.zeros((1, 23)))
        run = {"args": {"hidden": [256, 256], "critic_layernorm": layernorm}}
        expected = sum(x.size for x in jax.tree.leaves(params))
        assert seem_report.num_params(run, 23) == expected
    assert expected == 72_193 + 2 * 2 * 256  # (23+1)·256 + 257·256 + 257, and two LayerNorms


def test_sgd_prediction_is_one_exact_gradient_step_for_a_linear_critic():
    """For Q(s, a) = φ(s, a)ᵀθ with fixed features the NTK is constant, so one SGD step on the
    mean squared TD error over the probe (target = online, stop-gradient) moves the TD errors by
    exactly (I + c·A) with c = sgd_step_factor and A = γΦ*Φᵀ − ΦΦᵀ of common.seem_dense."""
    rng = np.random.default_rng(0)
    n, d, gamma, lr = 12, 5, 0.9, 0.01
    obs, act, next_obs, next_act = (jnp.asarray(rng.normal(size=(n, k)), jnp.float32) for k in (3, 2, 3, 2))
    rewards = jnp.asarray(rng.normal(size=n), jnp.float32)
    features = lambda s, a: jnp.tanh(jnp.concatenate([s, a], -1) @ jnp.asarray(  # noqa: E731
        np.random.default_rng(1).normal(size=(5, d)), jnp.float32))
    q_fn = lambda p, s, a: features(s, a) @ p["theta"]  # noqa: E731
    params = {"theta": jnp.asarray(rng.normal(size=d), jnp.float32)}

    def td_error(p):
        return q_fn(p, obs, act) - rewards - gamma * q_fn(p, next_obs, next_act)

    def loss(p):
        target = jax.lax.stop_gradient(rewards + gamma * q_fn(p, next_obs, next_act))
        return jnp.mean((q_fn(p, obs, act) - target) ** 2)

    stepped = jax.tree.map(lambda w, g: w - lr * g, params, jax.grad(loss)(params))
    _, _, a = common.seem_dense(q_fn, params, (obs, act, next_obs, next_act), gamma)
    c = seem_report.sgd_step_factor(lr, d, n)
    np.testing.assert_allclose(np.asarray(td_error(stepped)), (np.eye(n) + c * a) @ np.asarray(td_error(params)),
                               rtol=1e-4, atol=1e-5)


def _fake_run(folder: Path, layernorm: bool, scores: list[list[float]], fraction=1.0, transitions=None):
    folder.mkdir(parents=True)
    args = {"dataset": "offlax/hopper/medium-v0", "seed": 0, "num_seeds": 2, "total_steps": 300, "last_evals": 2,
            "critic_layernorm": layernorm, "data_fraction": fraction, "num_transitions": transitions}
    (folder / "config.json").write_text(json.dumps({"algo": "td3_bc", "args": args, "command": "x"}))
    rows = [{"step": 100 * (i + 1), "returns": [[0.0], [0.0]], "score": s, "phase": "offline"}
            for i, s in enumerate(scores)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "summary.json").write_text(json.dumps({"seeds": [0, 1]}))


def test_scarce_table_by_hand(tmp_path):
    _fake_run(tmp_path / "a", False, [[50, 10], [20, 30], [40, 50]], fraction=0.01)  # last 2: 30, 40 -> 35 ± 5
    _fake_run(tmp_path / "b", True, [[0, 0], [60, 70], [80, 90]], fraction=0.01)  # last 2: 70, 80 -> 75 ± 5
    _fake_run(tmp_path / "c", True, [[1, 1], [2, 2], [4, 4]], transitions=10)  # without-LN run missing
    (tmp_path / "d").mkdir()
    runs = [seem_report.load_run(p) for p in seem_report.find_runs([tmp_path])]
    table = seem_report.scarce_section(runs)
    assert table[2] == ("| td3_bc | hopper/medium | 1% | 35.0 ± 5.0 | 75.0 ± 5.0 | +40.0 | 30 / 40 | 70 / 80 |")
    assert table[3].startswith("| td3_bc | hopper/medium | 10 transitions | not run | 3.0 ± 0.0 | - |")
