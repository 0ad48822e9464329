"""Updates per second and achieved GFLOP/s of every algorithm's fused update.

    python benchmarks/throughput.py --out benchmarks/results/throughput.md
    python benchmarks/throughput.py --algos iql cql --obs-dim 11 --act-dim 3 --seeds 1 5

For each algorithm this builds the script's own agent (`make_agent`, default hyper-parameters)
and its fused chunk of updates (`train_chunk`: one `lax.scan`, batches sampled on the device)
on synthetic data of the chosen sizes (default: HalfCheetah's, 17-d observations, 6-d actions,
batch 256), for one seed and for N vmapped seeds. It reports:

- compile time, apart from the timed runs;
- updates per second: the median over `--repeats` timed chunks of `--updates` updates (all
  seeds advance together, so for N seeds it is per seed-batch);
- FLOPs per update from XLA's cost analysis of the compiled one-update chunk, and achieved GFLOP/s
  = FLOPs per update x updates per second;
- memory: XLA's account of the compiled chunk (arguments + outputs + temporaries, less aliased);
- the machine's float32 matrix-product peak, measured in the same run (the best of several
  4096x4096 products), so that utilisation is a ratio on the same machine and moment.

An update is one critic update (TD3+BC: half of a group of two critic updates and one actor
update). SAC has no offline chunk; its row fuses SAC's `update` the same way on the synthetic data.
SMAC's row is its offline actor-critic update with Muon, `smac_adam` the same with `--optimizer adam`
(the difference is Muon's Newton-Schulz orthogonalisation), and the diffusion model, trained first,
is timed in its own row, `smac_score`. Run it on an otherwise idle machine: the numbers are only as good as that.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

ALGOS = ("bc", "sac", "iql", "cql", "cal_ql", "td3_bc", "smac", "smac_adam", "smac_score")


def synthetic_data(n: int, obs_dim: int, act_dim: int, seed: int = 0) -> dict:
    """Every field any script samples: transitions, MC returns (Cal-QL), the RvS signal w (SMAC)."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, obs_dim))
    data = {"observations": obs, "next_observations": obs + 0.1 * rng.normal(size=obs.shape),
            "actions": rng.uniform(-1, 1, (n, act_dim)), "rewards": rng.normal(size=n),
            "terminals": (rng.random(n) < 0.01).astype(float), "mc_returns": rng.normal(size=n) * 10,
            "w": rng.random(n)}
    return {k: jnp.asarray(v, jnp.float32) for k, v in data.items()}


def learner(algo: str, obs_dim: int, act_dim: int, batch: int):
    """(init(key) -> state of one seed, chunk(state, data, num_updates) -> (state, metrics))."""
    name = "smac" if algo.startswith("smac") else algo
    mod = importlib.import_module(f"algorithms.{name}")
    args = dataclasses.replace(mod.Args(), batch_size=batch)
    if algo == "smac_adam":  # the ablation's optimiser: Muon's Newton-Schulz iterations are what it removes
        args = dataclasses.replace(args, optimizer="adam")
    if algo == "bc":
        actor, tx = mod.Actor(args.hidden, act_dim), optax.adam(args.lr)
        return (lambda k: mod.create_state(k, actor, tx, obs_dim),
                lambda s, d, n: mod.train_chunk(s, d, actor, tx, dataclasses.replace(args, eval_every=n)))
    if algo == "sac":
        args = dataclasses.replace(args, total_steps=1)  # a one-row replay buffer: data come from `data`
        agent = mod.make_agent(args, obs_dim, act_dim)

        def chunk(state, data, n):
            def body(state, _):
                key, k_batch = jax.random.split(state.key)
                batch_ = common.sample_batch(k_batch, {k: data[k] for k in common.TRANSITION_KEYS}, args.batch_size)
                return mod.update(state.replace(key=key), batch_, agent)
            return jax.lax.scan(body, state, None, length=n)

        return lambda k: mod.create_state(k, agent, obs_dim, act_dim, args), chunk
    agent = mod.make_agent(args, obs_dim, act_dim)
    if algo in ("iql", "td3_bc"):
        init = partial(mod.create_state, agent=agent, obs_dim=obs_dim, act_dim=act_dim)
    else:
        init = partial(mod.create_state, agent=agent, obs_dim=obs_dim)
    train = mod.score_chunk if algo == "smac_score" else mod.train_chunk
    return init, lambda s, d, n: train(s, d, agent=agent, num_updates=n)


def matmul_peak(n: int = 4096, repeats: int = 5) -> float:
    """Best float32 GFLOP/s of an n x n matrix product on this machine, now."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def measure(algo: str, num_seeds: int, obs_dim: int, act_dim: int, batch: int, updates: int, repeats: int,
            data: dict) -> dict:
    init, chunk = learner(algo, obs_dim, act_dim, batch)
    state = jax.vmap(init)(common.seed_keys(0, num_seeds))

    def compiled(n):
        fn = jax.jit(jax.vmap(lambda s, d: chunk(s, d, n), in_axes=(0, None)), donate_argnums=0)
        return common.compile_timed(fn, state, data)

    unit = 2 if algo == "td3_bc" else 1  # TD3+BC's chunk runs whole groups: 2 critic updates, 1 actor
    one, _ = compiled(unit)  # a loop of one trip is inlined by XLA, so its cost is one trip's
    cost = one.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", np.nan)) / unit
    fn, compile_s = compiled(updates)
    mem = fn.memory_analysis()
    memory = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
              - mem.alias_size_in_bytes) if mem is not None else np.nan
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        t0 = time.perf_counter()
        state, _ = fn(state, data)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    ups = updates / float(np.median(times[1:]))
    return {"algo": algo, "seeds": num_seeds, "updates_per_s": ups, "gflop_per_update": flops / 1e9,
            "gflops": flops * ups / 1e9, "compile_s": compile_s, "memory_mb": memory / 2 ** 20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 3], help="vmapped seed counts to measure")
    p.add_argument("--obs-dim", type=int, default=17, help="observation size (HalfCheetah: 17)")
    p.add_argument("--act-dim", type=int, default=6, help="action size (HalfCheetah: 6)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--updates", type=int, default=500, help="updates per timed chunk")
    p.add_argument("--repeats", type=int, default=3, help="timed chunks (median reported)")
    p.add_argument("--dataset-size", type=int, default=100_000, help="synthetic transitions to sample from")
    p.add_argument("--out", type=Path, help="markdown file to write (e.g. benchmarks/results/throughput.md)")
    a = p.parse_args()

    data = synthetic_data(a.dataset_size, a.obs_dim, a.act_dim)
    peak = matmul_peak()
    print(f"float32 matrix-product peak: {peak:.0f} GFLOP/s", flush=True)
    rows = []
    for algo in a.algos:
        for n in a.seeds:
            r = measure(algo, n, a.obs_dim, a.act_dim, a.batch, a.updates, a.repeats, data)
            rows.append(r)
            print(f"{algo:>10} x{n}: {r['updates_per_s']:8.1f} updates/s, {r['gflops']:6.1f} GFLOP/s "
                  f"({100 * r['gflops'] / peak:.0f}% of peak), compile {r['compile_s']:.1f} s, "
                  f"{r['memory_mb']:.0f} MB", flush=True)
    peak_after = matmul_peak()
    lines = [
        "# Throughput of the fused updates", "",
        f"Command: `python benchmarks/throughput.py {' '.join(sys.argv[1:])}`  ",
        f"Commit: {common.git_commit()}  ",
        f"Machine: {common.machine()} ({time.strftime('%Y-%m-%d')})", "",
        f"Problem: {a.obs_dim}-d observations, {a.act_dim}-d actions, batch {a.batch}, each script's default "
        f"networks and hyper-parameters, synthetic data ({a.dataset_size:,} transitions). Updates/s: median of "
        f"{a.repeats} chunks of {a.updates:,} fused updates, all seeds advancing together (per seed-batch); compile "
        "time apart. GFLOP per update: XLA's cost analysis of the compiled update, for all seeds. Memory: XLA's "
        "account of the compiled chunk (arguments, outputs and temporaries).", "",
        f"Float32 matrix-product peak measured in this run (4096x4096): {peak:.0f} GFLOP/s before the algorithms, "
        f"{peak_after:.0f} GFLOP/s after; '% peak' uses the higher.", "",
        "| algo | seeds | updates/s | GFLOP/update | GFLOP/s | % peak | compile (s) | memory (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|"]
    peak = max(peak, peak_after)
    for r in rows:
        lines.append(f"| {r['algo']} | {r['seeds']} | {r['updates_per_s']:,.0f} | {r['gflop_per_update']:.3f} | "
                     f"{r['gflops']:.0f} | {100 * r['gflops'] / peak:.0f}% | {r['compile_s']:.1f} | "
                     f"{r['memory_mb']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)


if __name__ == "__main__":
    main()
