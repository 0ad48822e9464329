"""Runs a grid of training runs: algorithms x datasets x seed blocks x overrides.

    python benchmarks/sweep.py --algos iql td3_bc \\
        --datasets offlax/hopper/medium-replay-v0 offlax/walker2d/medium-v0 \\
        --seeds 0 1 2 --seeds-per-process 3 --set total_steps=200000 \\
        --grid critic_layernorm=true,false --protocol reduced --workers 2 --out sweeps/my_sweep

Every combination is one configuration and one process; it gets a fixed folder
`<out>/<config name>/` (e.g. `iql__offlax-hopper-medium-replay-v0__critic_layernorm=true__s0-2`)
that is passed to the script as `--runs-dir`, so the script's timestamped run folder lands inside
it. Running the same command again is safe and is how a sweep is continued:

  - a configuration whose folder holds a finished run (summary.json) is skipped;
  - one whose run stopped after a checkpoint is resumed exactly (`--resume <run folder>`);
  - anything else starts fresh (an unfinished run without a checkpoint is left beside it).

A run already in a configuration's folder must have been made with the same arguments (the
protocol, `--set` and `--grid` values); otherwise the sweep stops and names the difference, so
results with different settings are never mixed in one folder.

Protocols (`--protocol`), the defaults that `--set` and `--grid` override:

  full     the papers' protocol: 1,000,000 updates (environment steps for sac), 5 seeds (0-4)
           trained together in one process (--num-seeds 5), an evaluation every 5,000 steps.
  reduced  sized for a 2-core CPU: 200,000 updates (100,000 for cql, cal_ql and smac, whose
           updates cost 7 to 13 times the FLOPs of IQL's: benchmarks/results/throughput.md),
           3 seeds (0-2) in one process (--num-seeds 3), an evaluation every 5,000 steps.

Both leave every other argument (evaluation episodes, --last-evals, the algorithm's
hyper-parameters) at the script's default. Precedence: protocol < `--set` < `--grid`; explicit
`--seeds` / `--seeds-per-process` replace the protocol's.

Values: `true`/`false` for booleans (written `--flag` / `--no-flag`, or `--flag True` where the
argument may also be None), `none` for None, tuples as space-separated items (`--set "hidden=512
512"`) or in brackets (`--grid "hidden=[256,256],[512,512]"`). Keys may use dashes or underscores.
For sac, the `--datasets` values are environment ids (`--env-id`).

Modes: by default the configurations run here, `--workers` at a time, each logging to
`<out>/<config name>/log.txt`; with more than one worker, each is pinned to its share of the CPU
cores, and a worker with one core runs XLA single-threaded (`--no-pin` turns this off): on the
project's 2-core AVX2 host two single-threaded runs side by side did 17-46% more work than one run on
both cores, whose small matrix products share two threads poorly
(`benchmarks/results/pinning_avx2.md`); `--dry-run` prints the decisions and commands only; `--slurm`
writes `<out>/commands.txt` (one command per configuration still to run) and `<out>/sweep.sbatch`
(an array job, one index per line of commands.txt) to submit with `sbatch`. After a time-out,
run the same sweep command again and resubmit: finished runs are skipped, stopped ones resume.
Every mode except `--dry-run` writes `<out>/sweep.json` listing the configurations.

Nothing here imports JAX: the sweep reads each script's `Args` class from its source to check
the keys and to write the flags the way the script's command line (tyro) expects them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
ALGO_DIR = REPO_ROOT / "algorithms"

# Arguments the sweep itself sets; overriding them with --set or --grid is an error.
RESERVED = {"seed": "--seeds", "num_seeds": "--seeds / --seeds-per-process", "runs_dir": "--out",
            "resume": "(the sweep resumes runs itself)", "dataset": "--datasets", "env_id": "--datasets"}


@dataclasses.dataclass(frozen=True)
class Protocol:
    """A preset of training length, evaluation interval and seeds."""

    total_steps: int
    eval_every: int
    seeds: tuple[int, ...]
    seeds_per_process: int
    steps_by_algo: tuple[tuple[str, int], ...] = ()  # (algorithm, total_steps) where it differs

    def overrides(self, algo: str) -> dict[str, Any]:
        return {"total_steps": dict(self.steps_by_algo).get(algo, self.total_steps), "eval_every": self.eval_every}


PROTOCOLS = {
    "full": Protocol(total_steps=1_000_000, eval_every=5_000, seeds=(0, 1, 2, 3, 4), seeds_per_process=5),
    "reduced": Protocol(total_steps=200_000, eval_every=5_000, seeds=(0, 1, 2), seeds_per_process=3,
                        steps_by_algo=(("cql", 100_000), ("cal_ql", 100_000), ("smac", 100_000))),
}


class SweepError(ValueError):
    """A malformed grid, an unknown algorithm or argument, or a folder holding other settings."""


@dataclasses.dataclass
class Config:
    """One configuration: one process, one folder."""

    algo: str
    dataset: str
    seeds: tuple[int, ...]
    overrides: dict[str, Any]  # every argument the sweep sets apart from dataset and seeds
    grid: dict[str, Any]  # the --grid part of `overrides`, which names the configuration
    name: str

    def expected_args(self, dataset_key: str = "dataset") -> dict[str, Any]:
        """The values this configuration's run must have in its config.json."""
        return {dataset_key: self.dataset, "seed": self.seeds[0], "num_seeds": len(self.seeds), **self.overrides}


@dataclasses.dataclass
class Decision:
    """What to do with a configuration's folder: 'skip', 'resume' (run_dir) or 'fresh'."""

    action: str
    run_dir: Path | None = None
    note: str = ""


# --------------------------------------------------------------------------------------------
# The scripts' arguments, read from their source
# --------------------------------------------------------------------------------------------

def algorithm_names(algo_dir: Path = ALGO_DIR) -> list[str]:
    """The algorithm scripts: every algorithms/<name>.py except the package's __init__."""
    return sorted(p.stem for p in algo_dir.glob("*.py") if not p.stem.startswith("_"))


def algorithm_fields(algo: str, algo_dir: Path = ALGO_DIR) -> dict[str, str]:
    """{argument: annotation as written} of the script's `Args` dataclass, read with `ast` so
    that no JAX is imported."""
    path = algo_dir / f"{algo}.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Args":
            return {stmt.target.id: ast.unparse(stmt.annotation) for stmt in node.body
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}
    raise SweepError(f"{path} has no `class Args`; the sweep reads the arguments from it")


def check_algos(algos: list[str], algo_dir: Path = ALGO_DIR) -> None:
    valid = algorithm_names(algo_dir)
    unknown = [a for a in algos if a not in valid]
    if unknown:
        raise SweepError(f"unknown algorithm(s) {', '.join(unknown)}; valid: {', '.join(valid)}")


def dataset_key(fields: dict[str, str]) -> str:
    """The argument that names the data: `dataset` for offline scripts, `env_id` for sac."""
    if "dataset" in fields:
        return "dataset"
    if "env_id" in fields:
        return "env_id"
    raise SweepError("the script's Args has neither `dataset` nor `env_id`")


# --------------------------------------------------------------------------------------------
# Parsing --set and --grid
# --------------------------------------------------------------------------------------------

def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Splits at `sep` outside brackets: "[1,2],[3,4]" -> ["[1,2]", "[3,4]"]."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
            if depth < 0:
                raise SweepError(f"unbalanced brackets in {text!r}")
        if ch == sep and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if depth != 0:
        raise SweepError(f"unbalanced brackets in {text!r}")
    return parts + [current]


def parse_set(text: str) -> tuple[str, str]:
    """`key=value` -> (key with underscores, raw value)."""
    key, eq, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not eq or not key or not key.isidentifier():
        raise SweepError(f"--set {text!r}: expected key=value, e.g. --set total_steps=200000")
    if value.strip() == "":
        raise SweepError(f"--set {text!r}: empty value (use `none` for None)")
    return key, value.strip()


def parse_grid(text: str) -> tuple[str, list[str]]:
    """`key=v1,v2,...` -> (key, [raw values]); commas inside brackets belong to a tuple value."""
    key, eq, values = text.partition("=")
    key = key.strip().replace("-", "_")
    if not eq or not key or not key.isidentifier():
        raise SweepError(f"--grid {text!r}: expected key=v1,v2,..., e.g. --grid critic_layernorm=true,false")
    raw = [v.strip() for v in split_top_level(values)]
    if any(v == "" for v in raw):
        raise SweepError(f"--grid {text!r}: an empty value (two commas, or a trailing comma)")
    if len(set(raw)) != len(raw):
        raise SweepError(f"--grid {text!r}: a value is listed twice")
    return key, raw


def _bool(raw: str, key: str) -> bool:
    low = raw.lower()
    if low in ("true", "yes", "1", "on"):
        return True
    if low in ("false", "no", "0", "off"):
        return False
    raise SweepError(f"{key}={raw!r}: expected true or false")


def _number(raw: str, kind: type, key: str):
    try:
        if kind is int:
            value = float(raw.replace("_", ""))  # accepts 1e6 and 200_000
            if value != int(value):
                raise ValueError
            return int(value)
        return float(raw.replace("_", ""))
    except ValueError:
        raise SweepError(f"{key}={raw!r}: expected {'an integer' if kind is int else 'a number'}") from None


def coerce(raw: str, annotation: str, key: str) -> Any:
    """The typed value of a raw string, following the argument's annotation in the script."""
    ann = annotation.replace(" ", "")
    optional = "|None" in ann or "None|" in ann or ann.startswith("Optional[")
    base = ann.replace("|None", "").replace("None|", "")
    if base.startswith("Optional[") and base.endswith("]"):
        base = base[len("Optional["):-1]
    if optional and raw.lower() == "none":
        return None
    if base == "bool":
        return _bool(raw, key)
    if base in ("int", "float"):
        return _number(raw, int if base == "int" else float, key)
    if base.startswith("tuple["):
        item = base[len("tuple["):-1].split(",")[0]
        text = raw.strip()
        if text[:1] in "([" and text[-1:] in ")]":
            items = [x.strip() for x in split_top_level(text[1:-1]) if x.strip()]
        else:
            items = text.split()
        return tuple(_number(x, int if item == "int" else float, key) if item in ("int", "float") else x
                     for x in items)
    if base.startswith("Literal["):
        choices = ast.literal_eval(base[len("Literal"):].replace("[", "(", 1)[:-1] + ",)")
        if raw not in choices:
            raise SweepError(f"{key}={raw!r}: expected one of {', '.join(map(str, choices))}")
        return raw
    return raw


def typed(key: str, raw: str, algo: str, fields: dict[str, str]) -> Any:
    """Checks `key` is an argument of `algo` (suggesting the nearest name if not) and types `raw`."""
    if key in RESERVED:
        raise SweepError(f"{key} is set by the sweep; use {RESERVED[key]}")
    if key not in fields:
        near = difflib.get_close_matches(key, list(fields), n=1)
        hint = f"; did you mean {near[0]}?" if near else f"; its arguments: {', '.join(fields)}"
        raise SweepError(f"{algo} has no argument {key!r}{hint}")
    return coerce(raw, fields[key], key)


# --------------------------------------------------------------------------------------------
# Expansion, names, commands
# --------------------------------------------------------------------------------------------

def seed_blocks(seeds: list[int], per_process: int) -> list[tuple[int, ...]]:
    """Seeds in blocks of `per_process`, in the order given; each block must be consecutive
    ascending, since one process trains seeds seed, seed+1, ... (--seed s --num-seeds n)."""
    if per_process < 1:
        raise SweepError("--seeds-per-process must be at least 1")
    if not seeds:
        raise SweepError("no seeds given")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds {' '.join(map(str, seeds))}: a seed is listed twice")
    blocks = [tuple(seeds[i:i + per_process]) for i in range(0, len(seeds), per_process)]
    for block in blocks:
        if list(block) != list(range(block[0], block[0] + len(block))):
            raise SweepError(f"seeds {', '.join(map(str, block))} share a process (--seeds-per-process "
                             f"{per_process}) but are not consecutive; a process trains --seed s with "
                             f"--num-seeds n, i.e. seeds s..s+n-1. Reorder --seeds or change --seeds-per-process")
    return blocks


def format_value(value: Any) -> str:
    """A value as it appears in a configuration name: true/false, none, 256-256."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "-".join(format_value(v) for v in value)
    return str(value).replace("/", "-")


def config_name(algo: str, dataset: str, grid: dict[str, Any], seeds: tuple[int, ...]) -> str:
    """`<algo>__<dataset with / as ->__<key=value>...__s<first>[-<last>]`: fixed for a configuration."""
    parts = [algo, dataset.replace("/", "-")] + [f"{k}={format_value(v)}" for k, v in grid.items()]
    parts.append(f"s{seeds[0]}" if len(seeds) == 1 else f"s{seeds[0]}-{seeds[-1]}")
    return "__".join(parts)


def expand(algos: list[str], datasets: list[str], seeds: list[int], seeds_per_process: int,
           protocol: Protocol | None, sets: list[str], grids: list[str],
           fields: dict[str, dict[str, str]]) -> list[Config]:
    """All configurations, algorithm-major, then dataset, grid point (in --grid order) and seed block.

    `fields` maps each algorithm to its arguments (`algorithm_fields`). Overrides apply in the
    order protocol < --set < --grid."""
    if not algos or not datasets:
        raise SweepError("give at least one algorithm (--algos) and one dataset (--datasets)")
    blocks = seed_blocks(list(seeds), seeds_per_process)
    set_raw = dict(parse_set(s) for s in sets)
    grid_raw = [parse_grid(g) for g in grids]
    keys = [k for k, _ in grid_raw]
    if len(set(keys)) != len(keys):
        raise SweepError(f"--grid names a key twice: {', '.join(keys)}")
    configs = []
    for algo in algos:
        f = fields[algo]
        base = {k: v for k, v in (protocol.overrides(algo) if protocol else {}).items() if k in f}
        base.update({k: typed(k, raw, algo, f) for k, raw in set_raw.items()})
        grid_values = [[(k, typed(k, raw, algo, f)) for raw in values] for k, values in grid_raw]
        for dataset in datasets:
            for point in itertools.product(*grid_values):
                grid = dict(point)
                for block in blocks:
                    configs.append(Config(algo, dataset, block, {**base, **grid}, grid,
                                          config_name(algo, dataset, grid, block)))
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise SweepError("two configurations got the same name (a dataset listed twice?)")
    return configs


def flag(key: str, value: Any, annotation: str) -> list[str]:
    """The command-line words for one argument, as tyro parses them."""
    name = "--" + key.replace("_", "-")
    if isinstance(value, bool) and annotation.replace(" ", "") == "bool":
        return [name if value else f"--no-{key.replace('_', '-')}"]
    if isinstance(value, tuple):
        return [name, *(str(v) for v in value)]
    text = "None" if value is None else str(value)
    # "-inf" would be read as an option by argparse; "--x=-inf" is not
    return [f"{name}={text}"] if text.startswith("-") else [name, text]


def build_command(config: Config, fields: dict[str, str], runs_dir: Path, python: str = "python") -> list[str]:
    """The command that starts this configuration afresh, writing its run folder under `runs_dir`."""
    cmd = [python, "-m", f"algorithms.{config.algo}", f"--{dataset_key(fields).replace('_', '-')}", config.dataset,
           "--seed", str(config.seeds[0]), "--num-seeds", str(len(config.seeds))]
    for key, value in config.overrides.items():
        cmd += flag(key, value, fields[key])
    return cmd + ["--runs-dir", str(runs_dir)]


def resume_command(config: Config, run_dir: Path, python: str = "python") -> list[str]:
    """The command that continues a stopped run exactly (its saved config replaces the flags)."""
    return [python, "-m", f"algorithms.{config.algo}", "--resume", str(run_dir)]


# --------------------------------------------------------------------------------------------
# Skip, resume or start fresh
# --------------------------------------------------------------------------------------------

def _same(a: Any, b: Any) -> bool:
    """Equality of a JSON-loaded value with a typed one (tuples are lists in JSON)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def run_folders(config_dir: Path) -> list[Path]:
    """The run folders (holding config.json) in a configuration's folder, oldest first; the names
    end in a timestamp and the seed, so the name order is the time order."""
    if not config_dir.is_dir():
        return []
    return sorted((p for p in config_dir.iterdir() if (p / "config.json").is_file()),
                  key=lambda p: (p.name.rsplit("__", 2)[-2:], p.name))


def decide(config_dir: Path, expected: dict[str, Any] | None = None) -> Decision:
    """Skip a finished run, resume a stopped one, else start fresh. Raises SweepError if a run
    in the folder was made with other values than `expected` (the configuration's arguments)."""
    runs = run_folders(Path(config_dir))
    for run in runs:
        saved = json.loads((run / "config.json").read_text()).get("args", {})
        diff = [f"{k}: {saved[k]!r} there, {v!r} here" for k, v in (expected or {}).items()
                if k in saved and not _same(saved[k], v)]
        if diff:
            raise SweepError(f"{run} was made with other arguments ({'; '.join(diff)}). Use another --out, "
                             f"or move that run away, so that different settings are not mixed")
    finished = [r for r in runs if (r / "summary.json").is_file()]
    if finished:
        return Decision("skip", finished[-1], "finished")
    stopped = [r for r in runs if (r / "checkpoint.npz").is_file()]
    if stopped:
        note = f"resuming {stopped[-1].name}"
        return Decision("resume", stopped[-1], note)
    if runs:
        return Decision("fresh", None, f"unfinished run {runs[-1].name} has no checkpoint; starting fresh beside it")
    return Decision("fresh")


def last_progress(config_dir: Path) -> tuple[int, float | None] | None:
    """(last logged step, its mean score or return) of the newest run in a configuration's folder."""
    runs = run_folders(config_dir)
    if not runs or not (runs[-1] / "metrics.jsonl").is_file():
        return None
    lines = [x for x in (runs[-1] / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if not lines:
        return None
    row = json.loads(lines[-1])
    return row["step"], row.get("score_mean", row.get("return_mean"))


# --------------------------------------------------------------------------------------------
# Slurm
# --------------------------------------------------------------------------------------------

def slurm_script(out: Path, num_tasks: int, time_limit: str, cpus: int, gpus: int, partition: str | None,
                 max_running: int | None = None, repo_root: Path = REPO_ROOT) -> str:
    """An sbatch array job: task i runs line i+1 of <out>/commands.txt from the repository root."""
    array = f"0-{num_tasks - 1}" + (f"%{max_running}" if max_running else "")
    lines = ["#!/bin/bash", f"#SBATCH --job-name=offlax-{out.name}", f"#SBATCH --array={array}",
             f"#SBATCH --time={time_limit}", f"#SBATCH --cpus-per-task={cpus}"]
    if gpus:
        lines.append(f"#SBATCH --gres=gpu:{gpus}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += [f"#SBATCH --output={out}/slurm/%A_%a.out",
              "# One configuration per array index; the commands were decided (fresh or --resume) by",
              "# benchmarks/sweep.py. After a time-out, run the same sweep.py command again and resubmit.",
              "set -euo pipefail",
              f"cd {shlex.quote(str(repo_root))}",
              "if [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi",
              f'cmd=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(out / "commands.txt"))})',
              'echo "task $SLURM_ARRAY_TASK_ID on $(hostname): $cmd"',
              'eval "$cmd"', ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Running locally
# --------------------------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def core_slots(workers: int, cores: list[int]) -> list[list[int]] | None:
    """Splits the usable CPU cores into `workers` contiguous groups, one per worker slot, or None
    when there are fewer cores than workers (then nothing is pinned)."""
    cores = sorted(cores)
    if workers > len(cores):
        return None
    per, extra = divmod(len(cores), workers)
    starts = [i * per + min(i, extra) for i in range(workers + 1)]
    return [cores[starts[i]:starts[i + 1]] for i in range(workers)]


def worker_env(cores: list[int] | None, env: dict[str, str]) -> dict[str, str]:
    """The environment of a worker pinned to `cores`: with one core, XLA's CPU backend is made
    single-threaded (its thread pool is sized by the machine, not by the affinity mask)."""
    env = dict(env)
    if cores is not None and len(cores) == 1:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} {flags}" if env.get("XLA_FLAGS") else flags
    return env


def run_local(jobs: list[tuple[Config, list[str], Path]], workers: int, poll_s: float = 5.0,
              progress_every_s: float = 600.0, slots: list[list[int]] | None = None) -> list[str]:
    """Runs (config, command, config folder) jobs, `workers` at a time, each logging to
    <config folder>/log.txt; prints starts, ends and, every `progress_every_s`, each running
    job's last logged step. With `slots` (one list of CPU cores per worker, see `core_slots`),
    each job runs pinned to a free slot's cores. Returns the names of the configurations that failed."""
    pending, running, failed, done = list(jobs), [], [], 0
    free = list(range(workers))  # worker slots not running a job
    last_report = time.time()
    try:
        while pending or running:
            while pending and len(running) < workers:
                config, cmd, folder = pending.pop(0)
                slot = free.pop(0)
                cores = slots[slot] if slots else None
                folder.mkdir(parents=True, exist_ok=True)
                log = open(folder / "log.txt", "a")
                log.write(f"\n$ {shlex.join(cmd)}\n" + (f"# pinned to CPU cores {cores}\n" if cores else ""))
                log.flush()
                proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                        env=worker_env(cores, dict(os.environ)),
                                        preexec_fn=(lambda c=cores: os.sched_setaffinity(0, c)) if cores else None)
                running.append((config, proc, log, time.time(), folder, slot))
                print(f"[{done}/{len(jobs)} done] started {config.name} (pid {proc.pid}"
                      + (f", cores {cores})" if cores else ")"), flush=True)
            time.sleep(poll_s)
            for item in list(running):
                config, proc, log, t0, folder, slot = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                free.append(slot)
                log.close()
                done += 1
                status = "finished" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                if proc.returncode != 0:
                    failed.append(config.name)
                print(f"[{done}/{len(jobs)} done] {status} {config.name} after {_duration(time.time() - t0)}"
                      + ("" if proc.returncode == 0 else f"; see {folder / 'log.txt'}"), flush=True)
            if running and time.time() - last_report >= progress_every_s:
                last_report = time.time()
                for config, _, _, t0, folder, _ in running:
                    prog = last_progress(folder)
                    total = config.overrides.get("total_steps")
                    if isinstance(total, int):
                        total += config.overrides.get("online_steps") or 0
                    where = "no evaluation yet" if prog is None else (
                        f"step {prog[0]:,} of {total:,}" if isinstance(total, int) else f"step {prog[0]:,}")
                    score = "" if prog is None or prog[1] is None else f", last eval {prog[1]:.1f}"
                    print(f"    running {config.name}: {where}{score} ({_duration(time.time() - t0)})", flush=True)
    except KeyboardInterrupt:
        for _, proc, log, _, _, _ in running:
            proc.terminate()
        for _, proc, log, _, _, _ in running:
            proc.wait()
            log.close()
        print("interrupted; the same command resumes the stopped runs from their checkpoints", flush=True)
        raise SystemExit(130)
    return failed


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", nargs="+", required=True, metavar="ALGO",
                   help="algorithm scripts under algorithms/ (e.g. iql td3_bc)")
    p.add_argument("--datasets", nargs="+", required=True, metavar="ID",
                   help="dataset ids (environment ids for sac)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                   help="seeds (default: the protocol's, 0-4 full, 0-2 reduced)")
    p.add_argument("--seeds-per-process", type=int, metavar="N",
                   help="consecutive seeds trained together in one process with --num-seeds "
                        "(default: the protocol's, 5 full, 3 reduced)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="full",
                   help="preset of total steps, evaluation interval and seeds (see above; default: full)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="an argument for every configuration, overriding the protocol (repeatable)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", dest="grids",
                   help="an argument to sweep over, one configuration per value (repeatable: the product)")
    p.add_argument("--out", type=Path, required=True, help="the sweep's folder")
    p.add_argument("--workers", type=int, default=1, help="processes at once when running locally (default 1)")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin workers to CPU cores (by default, with --workers N > 1, each worker gets "
                        "1/N of the cores, and XLA runs single-threaded in a worker that has one)")
    p.add_argument("--progress-every", type=float, default=600, metavar="S",
                   help="seconds between progress lines of the running configurations (default 600)")
    p.add_argument("--dry-run", action="store_true", help="print the decisions and commands; run and write nothing")
    p.add_argument("--slurm", action="store_true",
                   help="write <out>/commands.txt and <out>/sweep.sbatch (an array job) instead of running")
    p.add_argument("--slurm-time", default="12:00:00", help="time limit per array task (default 12:00:00)")
    p.add_argument("--slurm-cpus", type=int, default=4, help="CPUs per array task (default 4)")
    p.add_argument("--slurm-gpus", type=int, default=1, help="GPUs per array task, 0 for none (default 1)")
    p.add_argument("--slurm-partition", help="partition to submit to (default: the cluster's)")
    p.add_argument("--slurm-max-running", type=int, metavar="N",
                   help="at most N array tasks at once (the array's %%N)")
    return p


def plan(a: argparse.Namespace, algo_dir: Path = ALGO_DIR):
    """(configs, fields, [(config, decision, command, folder)]) for parsed arguments."""
    check_algos(a.algos, algo_dir)
    protocol = PROTOCOLS[a.protocol]
    fields = {algo: algorithm_fields(algo, algo_dir) for algo in a.algos}
    seeds = a.seeds if a.seeds is not None else list(protocol.seeds)
    per_process = a.seeds_per_process if a.seeds_per_process is not None else protocol.seeds_per_process
    configs = expand(a.algos, a.datasets, seeds, per_process, protocol, a.sets, a.grids, fields)
    out = a.out.resolve()
    steps = []
    for c in configs:
        folder = out / c.name
        decision = decide(folder, c.expected_args(dataset_key(fields[c.algo])))
        if decision.action == "resume":
            cmd = resume_command(c, decision.run_dir)
        elif decision.action == "fresh":
            cmd = build_command(c, fields[c.algo], folder)
        else:
            cmd = []
        steps.append((c, decision, cmd, folder))
    return configs, fields, steps


def write_manifest(out: Path, a: argparse.Namespace, steps) -> None:
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "command": shlex.join(["python", "benchmarks/sweep.py", *sys.argv[1:]]),
        "protocol": a.protocol, "sets": a.sets, "grids": a.grids,
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "configs": [{"name": c.name, "folder": str(folder), "algo": c.algo, "dataset": c.dataset,
                     "seeds": list(c.seeds), "overrides": {k: list(v) if isinstance(v, tuple) else v
                                                           for k, v in c.overrides.items()},
                     "decision": d.action, "run": str(d.run_dir) if d.run_dir else None,
                     "command": shlex.join(cmd) if cmd else None}
                    for c, d, cmd, folder in steps],
    }
    (out / "sweep.json").write_text(json.dumps(manifest, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.workers < 1:
        raise SystemExit("error: --workers must be at least 1")
    try:
        configs, _, steps = plan(a)
    except SweepError as e:
        raise SystemExit(f"error: {e}") from None
    out = a.out.resolve()
    counts = {k: sum(d.action == k for _, d, _, _ in steps) for k in ("skip", "resume", "fresh")}
    print(f"{len(configs)} configurations: {counts['skip']} finished, {counts['resume']} to resume, "
          f"{counts['fresh']} to start", flush=True)
    for c, d, cmd, _ in steps:
        label = {"skip": "finished", "resume": "resume", "fresh": "start"}[d.action]
        extra = f" ({d.note})" if d.note and d.action == "fresh" else ""
        print(f"  {label:8s} {c.name}{extra}" + (f"\n           {shlex.join(cmd)}" if a.dry_run and cmd else ""))
    if a.dry_run:
        return 0
    write_manifest(out, a, steps)
    todo = [(c, cmd, folder) for c, d, cmd, folder in steps if cmd]
    if a.slurm:
        if not todo:
            print("nothing to run: every configuration has finished")
            return 0
        (out / "slurm").mkdir(parents=True, exist_ok=True)
        (out / "commands.txt").write_text("".join(shlex.join(cmd) + "\n" for _, cmd, _ in todo))
        (out / "sweep.sbatch").write_text(slurm_script(out, len(todo), a.slurm_time, a.slurm_cpus, a.slurm_gpus,
                                                       a.slurm_partition, a.slurm_max_running))
        print(f"wrote {out / 'commands.txt'} ({len(todo)} commands) and {out / 'sweep.sbatch'}; "
              f"submit with: sbatch {out / 'sweep.sbatch'}")
        return 0
    jobs = [(c, [sys.executable, *cmd[1:]], folder) for c, cmd, folder in todo]
    slots = None
    if a.pin and a.workers > 1 and hasattr(os, "sched_setaffinity"):
        slots = core_slots(a.workers, sorted(os.sched_getaffinity(0)))
        if slots is None:
            print(f"note: {a.workers} workers on {len(os.sched_getaffinity(0))} cores: not pinned", flush=True)
    failed = run_local(jobs, a.workers, progress_every_s=a.progress_every, slots=slots)
    if failed:
        print(f"{len(failed)} configuration(s) failed: {', '.join(failed)}")
        return 1
    print(f"all {len(configs)} configurations finished; report: python benchmarks/report.py {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
