"""SEEM's cost: matrix-free (`common.seem`) against dense (`common.seem_dense`), same critic and probe.

    python benchmarks/seem_cost.py --out benchmarks/results/seem_cost.md

A 256x256 ReLU critic Q(s, a) on a probe of N = 2,560 transitions of offlax/halfcheetah/medium-v0
(X = (s, a), X* = (s', a') with a' the data's next action in the same episode), at two points:
at initialisation, and after `--td-steps` TD (SARSA) updates on the dataset with γ = 0.99 and a
Polyak target, which gives a critic with a realistic spectrum. Each method runs in its own child
process so that its peak memory is its own: the peak resident memory (Linux VmHWM, reset after
the setup) above the setup's, the wall time of the first call (compilation included) and of a
second call, and the eigenvalue, whose relative disagreement with the dense value is reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(method: str, dataset_id: str, n: int, td_steps: int, gamma: float, excite: bool) -> dict:
    """Builds the critic and probe, then measures one method (runs in a fresh process)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    import common

    class Critic(nn.Module):
        @nn.compact
        def __call__(self, obs, act):
            x = jnp.concatenate([obs, act], -1)
            for _ in range(2):
                x = nn.relu(nn.Dense(256)(x))
            return nn.Dense(1)(x)[..., 0]

    ds = common.load_dataset(dataset_id)
    data = common.device_arrays(ds)
    ends = ds.episode_ends.astype(bool)
    next_act = np.where(ends[:, None], np.asarray(data["actions"]), np.roll(np.asarray(data["actions"]), -1, 0))
    data["next_actions"] = jnp.asarray(next_act)
    critic = Critic()
    params = critic.init(jax.random.PRNGKey(0), data["observations"][:1], data["actions"][:1])
    tx = optax.adam(3e-4)

    @jax.jit
    def train(params):
        def step(carry, key):
            params, target, opt = carry
            b = common.sample_batch(key, data, 256)
            y = b["rewards"] + gamma * (1 - b["terminals"]) * critic.apply(target, b["next_observations"],
                                                                            b["next_actions"])
            loss, g = jax.value_and_grad(lambda p: jnp.mean((critic.apply(p, b["observations"], b["actions"])
                                                              - y) ** 2))(params)
            updates, opt = tx.update(g, opt)
            params = optax.apply_updates(params, updates)
            return (params, optax.incremental_update(params, target, 0.005), opt), loss
        (params, _, _), losses = jax.lax.scan(step, (params, params, tx.init(params)),
                                              jax.random.split(jax.random.PRNGKey(1), td_steps))
        return params, losses

    if td_steps:
        params, _ = train(params)
    idx = np.random.default_rng(0).choice(len(ds), n, replace=False)
    probe = tuple(data[k][idx] for k in ("observations", "actions", "next_observations", "next_actions"))
    if excite:  # X* = 2X: a ReLU critic's gradients roughly double, so A ≈ (2γ − 1)ΦΦᵀ self-excites
        probe = (probe[0], probe[1], 2 * probe[0], 2 * probe[1])
    jax.block_until_ready((params, probe))
    q_fn = lambda p, s, a: critic.apply(p, s, a)  # noqa: E731

    times, peaks, out = [], [], None
    for _ in range(2):
        base = _rss_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
        t0 = time.perf_counter()
        if method == "dense":
            lam, norm, _ = common.seem_dense(q_fn, params, probe, gamma)
            out = {"lambda": lam, "normalized": norm, "converged": True}
        else:
            lam, norm, converged = common.seem(q_fn, params, probe, gamma)
            out = {"lambda": lam, "normalized": norm, "converged": bool(converged)}
        times.append(time.perf_counter() - t0)
        peaks.append((_rss_kb("VmHWM") - base) / 1024)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    return dict(out, method=method, td_steps=td_steps, excite=excite, first_s=times[0], second_s=times[1],
                peak_mb=peaks[0], peak2_mb=peaks[1], num_params=int(num_params), n=n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="offlax/halfcheetah/medium-v0")
    p.add_argument("--n", type=int, default=2560, help="probe size N")
    p.add_argument("--td-steps", type=int, nargs="+", default=[0, 20000],
                   help="critics to measure: after this many TD updates each (0: at initialisation)")
    p.add_argument("--excite", action="store_true",
                   help="also measure the last critic on a self-exciting probe, X* = 2X (SEEM clearly positive)")
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--out", type=Path)
    p.add_argument("--child", nargs=3, metavar=("METHOD", "TD_STEPS", "EXCITE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.dataset, a.n, int(a.child[1]), a.gamma, a.child[2] == "1")))
        return

    import common

    rows = []
    cases = [(td, "0") for td in a.td_steps] + ([(a.td_steps[-1], "1")] if a.excite else [])
    for td, excite in cases:
        for method in ("dense", "matrix-free"):
            cmd = [sys.executable, __file__, "--dataset", a.dataset, "--n", str(a.n), "--gamma", str(a.gamma),
                   "--child", method, str(td), excite]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if res.returncode:
                sys.exit(f"{method} failed:\n{res.stderr[-3000:]}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    lines = ["# SEEM: matrix-free against dense", "",
             f"Command: `python benchmarks/seem_cost.py {' '.join(sys.argv[1:])}`  ",
             f"Commit: {common.git_commit()}  ",
             f"Machine: {common.machine()} ({time.strftime('%Y-%m-%d')})", "",
             f"A 256x256 ReLU critic ({rows[0]['num_params']:,} parameters) on a probe of N = {a.n:,} transitions of "
             f"{a.dataset}, γ = {a.gamma}; X* pairs s' with the data's next action. Each method ran in its own process; "
             "memory is the peak resident memory above the resident memory just before the call (VmHWM, reset before "
             "each call); the first call includes JIT compilation (XLA's compiler uses memory of its own), the "
             "second reuses the compiled code. "
             "Matrix-free: ARPACK (which='LR') on A·v = γ·jvp(Q(X*), vjp(Q(X), v)) − jvp(Q(X), vjp(Q(X), v)), "
             "‖A‖_F by Hutchinson's estimate (32 vectors); dense: explicit per-sample gradients Φ (N x P), A formed and "
             "fully eigendecomposed.", "",
             "| critic | method | λ_max | λ_max / ‖A‖_F | ARPACK converged | rel. diff. of λ vs dense | "
             "abs. diff. / ‖A‖_F | first call (s) | second call (s) | peak memory, first call (MB) | "
             "peak memory, second call (MB) |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for i in range(0, len(rows), 2):
        dense, free = rows[i], rows[i + 1]
        name = "at initialisation" if dense["td_steps"] == 0 else f"after {dense['td_steps']:,} TD updates"
        name += ", X* = 2X" if dense["excite"] else ""
        fro = dense["lambda"] / dense["normalized"]  # ‖A‖_F, exact from the dense matrix
        for r in (dense, free):
            if r is dense:
                converged = rel = absdiff = "—"
            else:
                converged = str(r["converged"])
                rel = f"{100 * abs(r['lambda'] - dense['lambda']) / abs(dense['lambda']):.2f}%"
                absdiff = f"{abs(r['lambda'] - dense['lambda']) / fro:.1e}"
            lines.append(f"| {name} | {r['method']} | {r['lambda']:.4g} | {r['normalized']:.4g} | {converged} | {rel} | "
                         f"{absdiff} | {r['first_s']:.1f} | {r['second_s']:.1f} | {r['peak_mb']:.0f} | {r['peak2_mb']:.0f} |")
        lines.append(f"| {name} | ratio dense / matrix-free | | | | | | {dense['first_s'] / free['first_s']:.1f}x | "
                     f"{dense['second_s'] / free['second_s']:.1f}x | {dense['peak_mb'] / max(free['peak_mb'], 1):.1f}x | "
                     f"{dense['peak2_mb'] / max(free['peak2_mb'], 1):.1f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
