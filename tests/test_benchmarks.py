"""benchmarks/sweep.py and benchmarks/report.py: grid expansion, commands, skip/resume decisions,
the report's statistics against hand-computed values on run folders written here by hand.

Nothing here trains or imports JAX: the sweep reads the scripts' Args from their source, and the
run folders are fabricated (config.json, metrics.jsonl, summary.json)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


sweep = _load("offlax_sweep", ROOT / "benchmarks" / "sweep.py")
report = _load("offlax_report", ROOT / "benchmarks" / "report.py")


def test_no_jax_or_common_imported():
    for module in (sweep, report):
        assert "import jax" not in Path(module.__file__).read_text()
        assert "import common" not in Path(module.__file__).read_text()


# --------------------------------------------------------------------------------------------
# sweep: expansion
# --------------------------------------------------------------------------------------------

FIELDS = {a: sweep.algorithm_fields(a) for a in ("iql", "td3_bc", "cql", "sac", "bc")}


def expand(algos=("iql",), datasets=("d/a-v0",), seeds=(0, 1, 2), per=3, protocol="reduced", sets=(), grids=()):
    return sweep.expand(list(algos), list(datasets), list(seeds), per,
                        sweep.PROTOCOLS[protocol] if protocol else None, list(sets), list(grids), FIELDS)


def test_algorithm_fields_read_from_source():
    assert FIELDS["iql"]["critic_layernorm"] == "bool"
    assert FIELDS["iql"]["hidden"] == "tuple[int, ...]"
    assert FIELDS["iql"]["cosine_decay"] == "bool | None"
    assert "env_id" in FIELDS["sac"] and "dataset" not in FIELDS["sac"]
    assert {"bc", "cal_ql", "cql", "iql", "sac", "td3_bc"} <= set(sweep.algorithm_names())


def test_expansion_counts_names_and_order():
    configs = expand(algos=("iql", "td3_bc"), datasets=("offlax/hopper/medium-replay-v0", "offlax/walker2d/medium-v0"),
                     seeds=range(6), per=3, grids=["critic_layernorm=true,false"])
    assert len(configs) == 2 * 2 * 2 * 2  # algos x datasets x grid points x seed blocks
    assert configs[0].name == "iql__offlax-hopper-medium-replay-v0__critic_layernorm=true__s0-2"
    assert configs[1].name == "iql__offlax-hopper-medium-replay-v0__critic_layernorm=true__s3-5"
    assert configs[2].name == "iql__offlax-hopper-medium-replay-v0__critic_layernorm=false__s0-2"
    assert configs[-1].name == "td3_bc__offlax-walker2d-medium-v0__critic_layernorm=false__s3-5"
    assert len({c.name for c in configs}) == 16
    assert configs[1].seeds == (3, 4, 5)
    assert configs[0].grid == {"critic_layernorm": True} and configs[2].grid == {"critic_layernorm": False}
    # two grid keys: their product; a single seed: s<seed>
    two = expand(seeds=[4], per=1, grids=["critic_layernorm=true,false", "expectile=0.7,0.8,0.9"])
    assert len(two) == 6
    assert two[0].name == "iql__d-a-v0__critic_layernorm=true__expectile=0.7__s4"


def test_seed_blocks():
    assert sweep.seed_blocks([0, 1, 2], 3) == [(0, 1, 2)]
    assert sweep.seed_blocks([0, 1, 2, 3, 4], 2) == [(0, 1), (2, 3), (4,)]
    assert sweep.seed_blocks([5, 6, 0, 1], 2) == [(5, 6), (0, 1)]
    assert sweep.seed_blocks([3, 1], 1) == [(3,), (1,)]
    with pytest.raises(sweep.SweepError, match="not consecutive"):
        sweep.seed_blocks([0, 2, 4], 3)
    with pytest.raises(sweep.SweepError, match="twice"):
        sweep.seed_blocks([0, 0, 1], 1)
    with pytest.raises(sweep.SweepError, match="at least 1"):
        sweep.seed_blocks([0], 0)


def test_override_precedence_protocol_set_grid():
    (c,) = expand()  # reduced protocol alone
    assert c.overrides == {"total_steps": 200_000, "eval_every": 5_000}
    (c,) = expand(protocol="full", seeds=[0], per=1)
    assert c.overrides["total_steps"] == 1_000_000
    iql, cql = expand(algos=("iql", "cql"))  # the reduced protocol halves the costliest updates' budget
    assert (iql.overrides["total_steps"], cql.overrides["total_steps"]) == (200_000, 100_000)
    (c,) = expand(algos=("cql",), sets=["total_steps=5000"])
    assert c.overrides["total_steps"] == 5000
    (c,) = expand(sets=["total_steps=1000", "eval-every=500"])  # --set beats the protocol; dashes ok
    assert c.overrides == {"total_steps": 1000, "eval_every": 500}
    a, b = expand(sets=["total_steps=1000"], grids=["total_steps=10,20"])  # --grid beats --set
    assert (a.overrides["total_steps"], b.overrides["total_steps"]) == (10, 20)
    assert a.overrides["eval_every"] == 5_000  # the rest of the protocol stays
    (c,) = expand(protocol=None, sets=["expectile=0.9"])
    assert c.overrides == {"expectile": 0.9}


def test_values_are_typed_by_the_scripts_annotations():
    (c,) = expand(sets=["hidden=512 512", "critic_layernorm=yes", "cosine_decay=none", "total_steps=1e6",
                        "family=antmaze"])
    assert c.overrides["hidden"] == (512, 512)
    assert c.overrides["critic_layernorm"] is True
    assert c.overrides["cosine_decay"] is None
    assert c.overrides["total_steps"] == 1_000_000 and isinstance(c.overrides["total_steps"], int)
    grid = expand(grids=["hidden=[256,256],[64, 64, 64]"])
    assert [g.overrides["hidden"] for g in grid] == [(256, 256), (64, 64, 64)]
    assert grid[1].name.endswith("__hidden=64-64-64__s0-2")


@pytest.mark.parametrize("kwargs, message", [
    (dict(sets=["total_steps"]), "expected key=value"),
    (dict(sets=["total_steps="]), "empty value"),
    (dict(grids=["critic_layernorm"]), "expected key=v1,v2"),
    (dict(grids=["critic_layernorm=true,,false"]), "empty value"),
    (dict(grids=["critic_layernorm=true,true"]), "listed twice"),
    (dict(grids=["hidden=[256,256"]), "unbalanced"),
    (dict(grids=["expectile=0.7", "expectile=0.8"]), "names a key twice"),
    (dict(sets=["critic_layernom=true"]), "did you mean critic_layernorm"),
    (dict(sets=["critic_layernorm=maybe"]), "expected true or false"),
    (dict(sets=["total_steps=lots"]), "expected an integer"),
    (dict(sets=["total_steps=1.5"]), "expected an integer"),
    (dict(sets=["family=mujoco"]), "expected one of locomotion"),
    (dict(sets=["seed=3"]), "set by the sweep; use --seeds"),
    (dict(grids=["dataset=a,b"]), "set by the sweep; use --datasets"),
    (dict(algos=("bc",), grids=["critic_layernorm=true,false"]), "bc has no argument 'critic_layernorm'"),
    (dict(datasets=("x", "x")), "same name"),
])
def test_malformed_grids_fail_clearly(kwargs, message):
    with pytest.raises(sweep.SweepError, match=message):
        expand(**kwargs)


def test_unknown_algorithm_lists_the_valid_ones():
    with pytest.raises(sweep.SweepError, match=r"unknown algorithm\(s\) iqll; valid: bc, cal_ql, cql, iql"):
        sweep.check_algos(["iql", "iqll"])
    with pytest.raises(SystemExit, match="unknown algorithm"):
        sweep.main(["--algos", "nope", "--datasets", "d", "--out", "/nonexistent/never", "--dry-run"])


# --------------------------------------------------------------------------------------------
# sweep: commands
# --------------------------------------------------------------------------------------------

def test_build_command_flags():
    on, off = expand(grids=["critic_layernorm=true,false"], sets=["hidden=512 512", "cosine_decay=false"])
    cmd = sweep.build_command(on, FIELDS["iql"], Path("/out/x"))
    assert cmd == ["python", "-m", "algorithms.iql", "--dataset", "d/a-v0", "--seed", "0", "--num-seeds", "3",
                   "--total-steps", "200000", "--eval-every", "5000", "--hidden", "512", "512",
                   "--cosine-decay", "False", "--critic-layernorm", "--runs-dir", "/out/x"]
    assert "--no-critic-layernorm" in sweep.build_command(off, FIELDS["iql"], Path("/out/x"))
    (c,) = expand(algos=("cql",), seeds=[2], per=1, sets=["cql_clip_diff_min=-inf", "target_entropy=none",
                                                         "orthogonal_init=false"])
    cmd = sweep.build_command(c, FIELDS["cql"], Path("r"))
    assert "--cql-clip-diff-min=-inf" in cmd  # "-inf" alone would parse as an option
    assert cmd[cmd.index("--target-entropy") + 1] == "None"
    assert "--no-orthogonal-init" in cmd and cmd[cmd.index("--seed") + 1] == "2"
    (c,) = expand(algos=("sac",), datasets=("Hopper-v5",), seeds=[0], per=1)
    assert sweep.build_command(c, FIELDS["sac"], Path("r"))[3:5] == ["--env-id", "Hopper-v5"]
    assert sweep.resume_command(c, Path("/r/run")) == ["python", "-m", "algorithms.sac", "--resume", "/r/run"]


# --------------------------------------------------------------------------------------------
# sweep: skip / resume / fresh
# --------------------------------------------------------------------------------------------

def fake_run_dir(config_dir: Path, name: str, args: dict, checkpoint=False, summary=False) -> Path:
    run = config_dir / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"algo": "iql", "args": args}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 5000, "score_mean": 12.5}) + "\n")
    if checkpoint:
        (run / "checkpoint.npz").write_bytes(b"x")
    if summary:
        (run / "summary.json").write_text("{}")
    return run


def test_decide_fresh_resume_skip(tmp_path):
    (c,) = expand()
    expected = c.expected_args()
    args = {"dataset": "d/a-v0", "seed": 0, "num_seeds": 3, "total_steps": 200000, "eval_every": 5000,
            "hidden": [256, 256], "critic_layernorm": False}
    folder = tmp_path / c.name
    assert sweep.decide(folder, expected).action == "fresh"  # no folder yet
    folder.mkdir()
    assert sweep.decide(folder, expected) == sweep.Decision("fresh")  # empty folder
    stale = fake_run_dir(folder, "iql__d-a-v0__20260101-000000__s0", args)
    d = sweep.decide(folder, expected)
    assert d.action == "fresh" and stale.name in d.note and "no checkpoint" in d.note
    stopped = fake_run_dir(folder, "iql__d-a-v0__20260102-000000__s0", args, checkpoint=True)
    assert sweep.decide(folder, expected) == sweep.Decision("resume", stopped, f"resuming {stopped.name}")
    assert sweep.last_progress(folder) == (5000, 12.5)
    done = fake_run_dir(folder, "iql__d-a-v0__20260103-000000__s0", args, checkpoint=True, summary=True)
    assert sweep.decide(folder, expected).action == "skip" and sweep.decide(folder, expected).run_dir == done


def test_decide_refuses_a_folder_made_with_other_settings(tmp_path):
    (c,) = expand(sets=["hidden=512 512"])
    fake_run_dir(tmp_path, "iql__d-a-v0__20260101-000000__s0",
                 {"dataset": "d/a-v0", "seed": 0, "num_seeds": 3, "total_steps": 1_000_000, "eval_every": 5000,
                  "hidden": [512, 512]}, checkpoint=True)
    with pytest.raises(sweep.SweepError, match="total_steps: 1000000 there, 200000 here"):
        sweep.decide(tmp_path, c.expected_args())
    assert sweep._same([512, 512], (512, 512)) and not sweep._same([512], (512, 512))
    assert sweep._same(5000, 5000.0) and not sweep._same(True, 1)


def sweep_argv(out, *extra):
    return ["--algos", "iql", "td3_bc", "--datasets", "offlax/hopper/medium-replay-v0", "offlax/walker2d/medium-v0",
            "--seeds", "0", "1", "2", "--seeds-per-process", "3", "--set", "total_steps=200000",
            "--grid", "critic_layernorm=true,false", "--protocol", "reduced", "--out", str(out), *extra]


def test_dry_run_writes_nothing(tmp_path, capsys):
    assert sweep.main(sweep_argv(tmp_path / "s", "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "8 configurations: 0 finished, 0 to resume, 8 to start" in out
    assert "--no-critic-layernorm --runs-dir" in out
    assert not (tmp_path / "s").exists()


def test_slurm_writes_array_job_and_skips_finished(tmp_path):
    out = tmp_path / "s"
    assert sweep.main(sweep_argv(out, "--slurm", "--slurm-time", "02:00:00", "--slurm-gpus", "0",
                                 "--slurm-partition", "cpu")) == 0
    script = (out / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-7\n" in script
    assert "#SBATCH --time=02:00:00" in script and "#SBATCH --partition=cpu" in script
    assert "--gres" not in script and "SLURM_ARRAY_TASK_ID + 1" in script and str(out / "commands.txt") in script
    commands = (out / "commands.txt").read_text().splitlines()
    assert len(commands) == 8 and commands[0].startswith("python -m algorithms.iql --dataset offlax/hopper/")
    manifest = json.loads((out / "sweep.json").read_text())
    assert [c["name"] for c in manifest["configs"]][:2] == [
        "iql__offlax-hopper-medium-replay-v0__critic_layernorm=true__s0-2",
        "iql__offlax-hopper-medium-replay-v0__critic_layernorm=false__s0-2"]
    # one configuration finished, one stopped: 7 tasks, one of them a resume
    args = {"dataset": "offlax/hopper/medium-replay-v0", "seed": 0, "num_seeds": 3, "total_steps": 200000,
            "eval_every": 5000, "critic_layernorm": True}
    fake_run_dir(out / manifest["configs"][0]["name"], "iql__x__20260101-000000__s0", args, summary=True)
    stopped = fake_run_dir(out / manifest["configs"][1]["name"], "iql__x__20260101-000000__s0",
                           {**args, "critic_layernorm": False}, checkpoint=True)
    assert sweep.main(sweep_argv(out, "--slurm", "--slurm-max-running", "2")) == 0
    assert "#SBATCH --array=0-6%2\n" in (out / "sweep.sbatch").read_text()
    assert "#SBATCH --gres=gpu:1" in (out / "sweep.sbatch").read_text()
    commands = (out / "commands.txt").read_text().splitlines()
    assert len(commands) == 7 and commands[0] == f"python -m algorithms.iql --resume {stopped}"
    decisions = [c["decision"] for c in json.loads((out / "sweep.json").read_text())["configs"]]
    assert decisions[:3] == ["skip", "resume", "fresh"]


# --------------------------------------------------------------------------------------------
# report: statistics
# --------------------------------------------------------------------------------------------

def test_iqm_by_hand():
    assert report.iqm([4, 1, 3, 2]) == pytest.approx(2.5)  # the middle two of four
    assert report.iqm([0, 3, 12]) == pytest.approx((0 + 4 * 3 + 12) / 6)  # = 4: quarter weights at the ends
    assert report.iqm([1, 2, 3, 4, 5]) == pytest.approx(3.0)
    assert report.iqm([1, 2, 3, 4, 100]) == pytest.approx(3.0)  # the outlier has no weight
    assert report.iqm([1, 2, 3, 4, 5, 60]) == pytest.approx((2 / 12 + 3 / 6 + 4 / 6 + 5 / 12) / 0.5)  # 3.5
    assert report.iqm([7]) == 7 and report.iqm([0, 10]) == 5
    assert np.isnan(report.iqm([]))
    x = np.random.default_rng(1).normal(size=12)
    from scipy.stats import trim_mean
    assert report.iqm(x) == pytest.approx(trim_mean(x, 0.25))  # n divisible by 4: the trimmed mean
    assert report.iqm_weights(7).sum() == pytest.approx(1.0)


def test_bootstrap_ci():
    # the mean of two resampled values in {0, 1}: 0, 0.5, 1 with probability 1/4, 1/2, 1/4
    assert report.bootstrap_ci([0, 1], stat=np.mean) == (0.0, 1.0)
    assert report.bootstrap_ci([5, 5, 5]) == (5.0, 5.0)
    values = [10, 20, 30, 90]
    low, high = report.bootstrap_ci(values)
    assert low <= report.iqm(values) <= high and 10 <= low < high <= 90
    assert report.bootstrap_ci(values) == (low, high)  # fixed seed: reproducible
    assert report.bootstrap_ci(values, stat=report.iqm) == (low, high)  # the vectorised path agrees


def test_drop_and_regret_by_hand():
    offline = np.array([75.0, 85.0])
    env_steps = [25_000, 50_000, 75_000, 100_000]
    online = np.array([[40, 90], [60, 95], [90, 100], [100, 100]], float)
    # window 50k: seed 0 falls to 40 (drop 35); seed 1 never falls below 85 (drop 0)
    np.testing.assert_allclose(report.online_drop(offline, env_steps, online, 50_000), [35.0, 0.0])
    np.testing.assert_allclose(report.online_drop(offline, env_steps, online, 25_000), [35.0, 0.0])
    np.testing.assert_allclose(report.online_drop([75, 95], env_steps, online, 100_000), [35.0, 5.0])
    assert np.isnan(report.online_drop(offline, env_steps, online, 10_000)).all()
    np.testing.assert_allclose(report.cumulative_regret(online), [(0.6 + 0.4 + 0.1 + 0) / 4, (0.1 + 0.05) / 4])
    # min-max within a dataset: hopper's three regrets 0.2, 0.6, 0.4 -> 0, 1, 0.5; walker's lone one has none
    normalised = report.minmax_regret(["hopper", "walker", "hopper", "hopper"], [0.2, 0.3, 0.6, 0.4])
    np.testing.assert_allclose(np.asarray(normalised)[[0, 2, 3]], [0.0, 1.0, 0.5])
    assert np.isnan(normalised[1]) and np.isnan(report.minmax_regret(["a", "a"], [0.5, 0.5])).all()
    np.testing.assert_allclose(report.last_score(online, 2), [95.0, 100.0])
    np.testing.assert_allclose(report.last_score(online, 99), online.mean(0))
    np.testing.assert_allclose(report.best_score(online), [100.0, 100.0])


# --------------------------------------------------------------------------------------------
# report: fabricated run folders
# --------------------------------------------------------------------------------------------

def write_run(root: Path, name: str, *, algo="iql", dataset="offlax/hopper/medium-v0", seed=0, scores,
              steps=None, total_steps=None, online_steps=0, last_evals=2, returns=None, extra_args=None,
              updates_per_s=100.0, finished=True, commit="abc1234", machine="test machine"):
    """A run folder as common.Run writes it. `scores`: (T, S) per-evaluation per-seed scores;
    rows at steps beyond total_steps are online rows."""
    scores = np.asarray(scores, float)
    num_seeds = scores.shape[1]
    steps = steps or [5000 * (i + 1) for i in range(len(scores))]
    total_steps = total_steps or steps[-1] - online_steps
    run = root / name
    run.mkdir(parents=True)
    args = {"dataset": dataset, "seed": seed, "num_seeds": num_seeds, "total_steps": total_steps,
            "eval_every": 5000, "last_evals": last_evals, "runs_dir": str(root), "resume": None, "wandb": False,
            "hidden": [256, 256], "critic_layernorm": False, "online_steps": online_steps, **(extra_args or {})}
    (run / "config.json").write_text(json.dumps({
        "algo": algo, "args": args, "command": f"/x/algorithms/{algo}.py --dataset {dataset} --seed {seed}",
        "commit": commit, "machine": machine}))
    rows = []
    for i, (step, s) in enumerate(zip(steps, scores)):
        r = returns[i] if returns is not None and i < len(returns) else [[10.0 * x] * 2 for x in s]
        row = {"step": step, "returns": r, "score": s.tolist(), "score_mean": float(s.mean()), "compile_s": 2.0}
        if step <= total_steps:
            row.update(phase="offline", updates_per_s=updates_per_s)
        else:
            row.update(phase="online", env_steps=step - total_steps, steps_per_s=50.0)
        rows.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (run / "summary.json").write_text(json.dumps({"seeds": list(range(seed, seed + num_seeds))}))
    return run


OFFLINE_A = [[10, 20, 30], [40, 50, 60], [30, 70, 20], [50, 30, 140]]  # seeds 0-2, four evaluations
OFFLINE_B = [[0], [0], [0], [60]]  # seed 3 of the same configuration


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    # the two runs of one configuration differ in bookkeeping only (checkpoints, a reused part's folder)
    write_run(root, "iql__h__1__s0", scores=OFFLINE_A, updates_per_s=100.0,
              returns=[None] * 3 + [[[100, 200], [300, 300], [50, 50]]],
              extra_args={"checkpoint_every": 50_000, "score_from": "/runs/a"})
    write_run(root, "iql__h__2__s3", seed=3, scores=OFFLINE_B, updates_per_s=300.0, finished=False,
              returns=[[[1.0]]] * 3 + [[[40.0, 60.0]]], extra_args={"checkpoint_every": 5_000, "score_from": "/runs/b"})
    write_run(root, "iql__h__3__s0", scores=[[1, 2], [3, 4], [5, 6], [7, 8]], extra_args={"critic_layernorm": True})
    # offline 4 x 25k updates, then 4 online evaluations every 25k environment steps
    write_run(root, "td3_bc__w__4__s0", algo="td3_bc", dataset="offlax/walker2d/medium-v0", online_steps=100_000,
              steps=[25_000 * (i + 1) for i in range(8)], total_steps=100_000,
              scores=[[50, 60], [60, 70], [70, 80], [80, 90], [40, 90], [60, 95], [90, 100], [100, 100]],
              commit="def5678", machine="other machine")
    # online SAC from scratch: no offline phase (total_steps counts environment steps)
    write_run(root, "sac__H__s0", algo="sac", dataset=None, online_steps=10_000, extra_args={"env_id": "Hopper-v5"},
              scores=[[20, 40], [60, 80]])
    return root


def test_grouping_and_pooled_statistics(runs):
    loaded = [report.load_run(p) for p in report.find_runs([runs])]
    groups, notes = report.group_runs(loaded)
    assert notes == []
    by_label = {(g["algo"], g["label"]): g for g in groups}
    assert set(by_label) == {("iql", "critic_layernorm=False"), ("iql", "critic_layernorm=True"), ("td3_bc", ""),
                           ("sac", "")}
    pooled = by_label[("iql", "critic_layernorm=False")]
    assert [r["name"] for r in pooled["runs"]] == ["iql__h__1__s0", "iql__h__2__s3"]
    s = report.group_stats(pooled)
    # last = mean of the final two evaluations per seed: (30+50)/2, (70+30)/2, (20+140)/2, (0+60)/2
    np.testing.assert_allclose(s["last"], [40, 50, 80, 30])
    np.testing.assert_allclose(s["best"], [50, 70, 140, 60])
    assert s["last_mean_std"] == pytest.approx((50.0, np.sqrt(350.0)))
    assert s["last_iqm"] == pytest.approx(45.0)  # middle two of 30, 40, 50, 80
    assert s["best_iqm"] == pytest.approx(65.0)  # middle two of 50, 60, 70, 140
    assert s["last_ci"][0] <= 45.0 <= s["last_ci"][1]
    np.testing.assert_allclose(s["final_returns"], [150, 300, 50, 50])
    assert s["updates_per_s"] == 200.0  # median of 4 x 100 and 4 x 300
    assert s["seeds"] == 4 and not s["finished"] and "online" not in s
    # three seeds alone: IQM = (x1 + 4 x2 + x3) / 6
    alone = report.group_stats({"runs": pooled["runs"][:1]})
    assert alone["last_iqm"] == pytest.approx((40 + 4 * 50 + 80) / 6)
    assert report.group_stats({"runs": pooled["runs"][:1]}, last_evals=1)["last"].tolist() == [50, 30, 140]


def test_online_statistics(runs):
    (g,) = [g for g in report.group_runs([report.load_run(p) for p in report.find_runs([runs])])[0]
            if g["algo"] == "td3_bc"]
    s = report.group_stats(g)
    o = s["online"]
    np.testing.assert_allclose(o["per_seed"]["offline"], [75, 85])  # last 2 offline evaluations
    np.testing.assert_allclose(o["per_seed"]["final"], [95, 100])
    np.testing.assert_allclose(o["per_seed"]["drop"], [35, 0])
    np.testing.assert_allclose(o["per_seed"]["regret"], [0.275, 0.0375])
    assert o["env_steps"] == 100_000
    np.testing.assert_allclose(s["last"], [75, 85])  # the offline table uses the offline phase only
    np.testing.assert_allclose(s["best"], [80, 90])
    wide = report.group_stats(g, drop_window=100_000)["online"]["per_seed"]["drop"]
    np.testing.assert_allclose(wide, [35, 0])


def test_duplicate_seeds_keep_the_finished_run(tmp_path):
    write_run(tmp_path, "iql__h__1__s0", scores=[[10], [20], [30]])
    write_run(tmp_path, "iql__h__2__s0", scores=[[90], [90]], total_steps=15_000, finished=False)  # stopped
    write_run(tmp_path, "iql__h__3__s0", scores=[[90], [90]], total_steps=10_000)  # another configuration
    groups, notes = report.group_runs([report.load_run(p) for p in report.find_runs([tmp_path])])
    assert [[r["name"] for r in g["runs"]] for g in groups] == [["iql__h__1__s0"], ["iql__h__3__s0"]]
    assert len(notes) == 1 and "iql__h__2__s0" in notes[0]


def test_report_markdown_readme_copies_and_curves(runs, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Results\n\nEarlier results.\n\n## Data\n\ndata text\n")
    out, copies, png = tmp_path / "res" / "r.md", tmp_path / "copies", tmp_path / "res" / "curves.png"
    argv = [str(runs), "--title", "T", "--notes", "N", "--out", str(out), "--curves", str(png),
            "--copy-runs", str(copies), "--readme-section", "demo", "--readme", str(readme)]
    text = report.main(argv)
    assert out.read_text() == text and text.startswith("# T\n\nMade by `python benchmarks/report.py ") and "\nN\n" in text
    row = next(x for x in text.splitlines() if x.startswith("| iql | offlax/hopper/medium-v0 | critic_layernorm=False"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:] == ["4", "20,000*", "50.0 ± 18.7", cells[6], "80.0 ± 35.4", cells[8], "150, 300, 50, 50",
                         "200", "2.0"]
    assert cells[6].startswith("45.0 [") and cells[8].startswith("65.0 [")
    assert "| td3_bc | offlax/walker2d/medium-v0 | 2 | 100,000 | 80.0 ± 5.0 | 97.5 ± 2.5 | 17.5 ± 17.5 | 0.156 ± " \
        in text
    assert "drop (first 50,000 steps)" in text and "| regret | regret, min–max |" in text
    td3_row = next(x for x in text.splitlines() if x.startswith("| td3_bc | offlax/walker2d/medium-v0 | 2 | 100,000"))
    assert td3_row.endswith("| – |")  # the only fine-tuning on its dataset: nothing to normalise against
    # SAC (no offline phase) has its own table, over environment steps, and is not in the offline one
    offline_part, scratch_part = text.split("## Offline")[1].split("## Online from scratch")
    assert "| sac |" not in offline_part and "| updates/s |" in offline_part
    assert "| env steps | last |" in scratch_part and "| env steps/s | compile (s) |" in scratch_part
    assert "| sac | Hopper-v5 | 2 | 10,000 | 50.0 ± 10.0 | " in scratch_part and "| 600, 800 | 50 | 2.0 |" in scratch_part
    assert "![learning curves](curves.png)" in text and png.stat().st_size > 10_000
    assert ("`python -m algorithms.td3_bc --dataset offlax/walker2d/medium-v0 --seed 0` at commit def5678 "
            "on other machine") in text
    assert "`iql__h__2__s3` (unfinished)" in text
    # copies hold what the curves need and are inputs themselves (no checkpoints there)
    assert sorted(p.name for p in (copies / "iql__h__1__s0").iterdir()) == [
        "config.json", "metrics.jsonl", "summary.json"]
    assert sorted(p.name for p in (copies / "iql__h__2__s3").iterdir()) == ["config.json", "metrics.jsonl"]
    again = report.main([str(copies), "--title", "T", "--notes", "N"])
    assert again.split("## Offline")[1].split("## Provenance")[0] == text.split("## Offline")[1].split("## Learning")[0]
    # README: the section sits at the end of "## Results", before "## Data", and is replaced in place
    first = readme.read_text()
    assert first.index("Earlier results.") < first.index("<!-- results:demo -->") < first.index(
        "<!-- /results:demo -->") < first.index("## Data")
    section = first.split("<!-- results:demo -->\n")[1].split("<!-- /results:demo -->")[0]
    assert section.startswith("`python benchmarks/report.py ") and "abc1234, def5678" in section
    assert "other machine; test machine" in section and "| 17.5 ± 17.5 |" in section and "| 50.0 ± 18.7 |" in section
    assert "| sac | Hopper-v5 | 2 | 10,000 | 50.0 ± 10.0 | " in section
    report.main(argv)
    assert readme.read_text() == first and readme.read_text().count("<!-- results:demo -->") == 1


def test_readme_without_results_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\ntext\n")
    report.update_readme(readme, "a", "body 1")
    report.update_readme(readme, "b", "body 2")
    report.update_readme(readme, "a", "body 3")
    text = readme.read_text()
    assert text.count("## Results") == 1 and "body 1" not in text
    assert text.index("<!-- results:a -->\nbody 3\n<!-- /results:a -->") < text.index("<!-- results:b -->")


def test_report_rejects_missing_paths(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        report.main([str(tmp_path / "nothing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds none"):
        report.main([str(tmp_path / "empty")])


def test_run_local_logs_and_reports_failures(tmp_path, capsys):
    (ok, bad) = expand(grids=["critic_layernorm=true,false"])
    jobs = [(ok, [sys.executable, "-c", "print('trained')"], tmp_path / ok.name),
            (bad, [sys.executable, "-c", "import sys; sys.exit('diverged')"], tmp_path / bad.name)]
    failed = sweep.run_local(jobs, workers=2, poll_s=0.05)
    assert failed == [bad.name]
    assert "trained" in (tmp_path / ok.name / "log.txt").read_text()
    assert "diverged" in (tmp_path / bad.name / "log.txt").read_text()
    out = capsys.readouterr().out
    assert f"FAILED (exit 1) {bad.name}" in out and f"finished {ok.name}" in out


def test_core_slots_split_the_cores_among_workers():
    assert sweep.core_slots(2, [0, 1]) == [[0], [1]]
    assert sweep.core_slots(2, [3, 0, 2, 1, 4]) == [[0, 1, 2], [3, 4]]
    assert sweep.core_slots(1, [0, 1]) == [[0, 1]]
    assert sweep.core_slots(3, [0, 1]) is None  # fewer cores than workers: nothing pinned
    env = sweep.worker_env([1], {"XLA_FLAGS": "--xla_dump_to=/tmp/x", "HOME": "/root"})
    assert env["XLA_FLAGS"] == ("--xla_dump_to=/tmp/x --xla_cpu_multi_thread_eigen=false "
                                "intra_op_parallelism_threads=1") and env["HOME"] == "/root"
    assert "XLA_FLAGS" not in sweep.worker_env([0, 1], {}) and "XLA_FLAGS" not in sweep.worker_env(None, {})


def test_run_local_pins_a_worker_to_its_cores(tmp_path):
    import os
    core = min(os.sched_getaffinity(0))
    (config,) = expand()
    probe = "import os; print('cores', sorted(os.sched_getaffinity(0)), 'flags', os.environ.get('XLA_FLAGS'))"
    failed = sweep.run_local([(config, [sys.executable, "-c", probe], tmp_path)], workers=1, poll_s=0.05,
                             slots=[[core]])
    log = (tmp_path / "log.txt").read_text()
    assert not failed and f"cores [{core}] flags" in log and "intra_op_parallelism_threads=1" in log
