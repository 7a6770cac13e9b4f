"""bench sweep --executor (issue 26): cells as jobs through submitit.

Real jobs through submitit's LocalExecutor (separate processes, real results, a killed job and a
killed sweep resumed), the SLURM path rendered and checked against the README's own example, and
the refusals: a folder two sweeps share, SLURM's own message, no sbatch here."""
from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, bench

from bench.config import ConfigError, RunConfig

TINY = ["--size", "tiny", "--epochs", "1", "--batch-size", "8", "--model-size", "small", "--device", "cpu",
]


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "sweep.json").read_text())


def _rows(folder: Path) -> dict[str, dict]:
    return {r["key"]: r for r in _manifest(folder)["cells"]}


def _wait_for(what, timeout_s: float = 120.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            found = what()
        except (OSError, ValueError, KeyError):  # the manifest between writes: renamed into place, but maybe not yet there
            found = None
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def _kill_tree(pid: int) -> None:
    parent = psutil.Process(pid)
    for p in [*parent.children(recursive=True), parent]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _sweep(folder: Path, *more: str, batch: str = "4,8,16", env=None) -> subprocess.Popen:
    """The sweep in the background, its output in a file beside the folder (its jobs inherit it)."""
    log = open(folder.parent / "sweep.log", "w")
    return subprocess.Popen([sys.executable, "-m", "bench", "sweep", "--strategies", "single", "--batch", batch,
                             *TINY, "--executor", "submitit-local", "--out", str(folder), *more],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def test_a_submitit_local_sweep_runs_each_cell_as_its_own_job_and_resume_reruns_only_the_killed_one(tmp_path):
    folder = tmp_path / "sweep"
    proc = _sweep(folder)

    def second_running():
        rows = list(_manifest(folder)["cells"])
        return rows if rows[1].get("state") == "running" and rows[1].get("job_id") else None

    rows = _wait_for(second_running)
    keys = [r["key"] for r in rows]
    killed = int(rows[1]["job_id"])
    _kill_tree(killed)  # the job, not the sweep: it must record the loss and go on
    proc.wait(timeout=300)
    out = (tmp_path / "sweep.log").read_text()
    first = _rows(folder)
    assert [first[k]["state"] for k in keys] == ["done", "failed", "done"], out
    assert f"job {killed} ended (INTERRUPTED) without a result" in first[keys[1]]["error"]
    ids = [int(first[k]["job_id"]) for k in keys]
    assert len(set(ids)) == 3 and proc.pid not in ids  # three jobs, none of them the sweep's own process
    for k in (keys[0], keys[2]):  # each job's result is the run's own file
        result = json.loads((folder / f"{k}.json").read_text())
        assert result["status"] == "ok" and result["run_id"] == k
    kept = {k: (folder / f"{k}.json").stat().st_mtime_ns for k in (keys[0], keys[2])}

    again = bench("sweep", "--strategies", "single", "--batch", "4,8,16", *TINY, "--executor", "submitit-local",
                  "--out", folder, "--resume")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 already done" in again.stdout and "1 to run" in again.stdout
    rows = _rows(folder)
    assert all(rows[k]["state"] == "done" for k in keys)
    assert int(rows[keys[1]]["job_id"]) not in ids  # resubmitted: a new job
    assert [int(rows[k]["job_id"]) for k in (keys[0], keys[2])] == [ids[0], ids[2]]
    assert {k: (folder / f"{k}.json").stat().st_mtime_ns for k in kept} == kept  # untouched
    assert json.loads((folder / f"{keys[1]}.json").read_text())["status"] == "ok"

    status = bench("sweep", "--status", folder)
    assert status.returncode == 0 and "3 done" in status.stdout, status.stdout
    assert str(rows[keys[1]]["job_id"]) in status.stdout


def test_resume_waits_on_a_job_that_outlived_its_sweep_instead_of_submitting_it_again(tmp_path):
    folder = tmp_path / "sweep"
    slow = {"EMOTION_BENCH_FAULT": "slow:1500"}  # each step 16x longer: the job outlives the sweep by far
    proc = _sweep(folder, "--epochs", "8", batch="4", env=slow)
    row = _wait_for(lambda: (r := _manifest(folder)["cells"][0]).get("job_id") and r)
    job = int(row["job_id"])
    os.kill(proc.pid, signal.SIGKILL)  # the sweep dies; its job goes on
    proc.wait(timeout=30)
    assert psutil.pid_exists(job)
    again = bench("sweep", "--strategies", "single", "--batch", "4", *TINY, "--epochs", "8",
                  "--executor", "submitit-local", "--out", folder, "--resume", env=slow)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 still running as jobs, 0 to run" in again.stdout, again.stdout
    rows = _rows(folder)
    assert int(rows[row["key"]]["job_id"]) == job and rows[row["key"]]["state"] == "done"
    assert json.loads((folder / f"{row['key']}.json").read_text())["status"] == "ok"
    assert not psutil.pid_exists(job) or psutil.Process(job).status() == psutil.STATUS_ZOMBIE


def _readme_slurm() -> tuple[dict[str, str], list[str]]:
    """The README's SLURM example: its #SBATCH directives and its bench run arguments."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(#!/bin/bash\n#SBATCH.*?)```", text, re.S).group(1)
    directives = dict(re.findall(r"--([\w-]+)=(\S+)", block.splitlines()[1]))
    line = " ".join(block.split("srun bash -c '", 1)[1].replace("\\\n", " ").split())
    return directives, line.rstrip("'").split()


def test_the_rendered_sbatch_script_and_each_node_s_torchrun_line_match_the_readme_example(monkeypatch, tmp_path):
    from bench.executors import CellJob, executor_spec, place, sbatch_script
    from bench.launch import torchrun_command

    directives, argv = _readme_slurm()
    assert argv[:2] == ["bench", "run"]
    flags = dict(zip(argv[2::2], argv[3::2]))
    spec = executor_spec("slurm", {"gpus_per_node": int(directives["gpus-per-node"]),
                                   "cpus_per_task": int(directives["cpus-per-task"])})
    cfg = place(RunConfig(strategy=flags["--strategy"], precision=flags["--precision"], devices=int(flags["--gpus"]),
                          out_dir=flags["--out"]), spec)
    script = sbatch_script(cfg, spec, tmp_path)
    rendered = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, re.M))
    for name, value in directives.items():
        assert rendered[name] == value, (name, script)
    assert re.search(r"^srun .* -m submitit\.core\._submit ", script, re.M)

    # node 1 of a job on gpu07 and gpu08, as SLURM's environment describes it
    for k, v in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "42", "SLURM_NODEID": "1", "SLURM_PROCID": "1",
                 "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "2",
                 "SLURM_JOB_NODELIST": "gpu[07-08]"}.items():
        monkeypatch.setenv(k, v)
    ours = CellJob.node_config(cfg)
    head = "gpu07"  # `scontrol show hostnames gpu[07-08] | head -n 1`
    theirs = RunConfig(strategy=flags["--strategy"], precision=flags["--precision"], devices=int(flags["--gpus"]),
                       nodes=int(flags["--nnodes"]), node_rank=int(flags["--node-rank"].replace("$SLURM_NODEID", "1")),
                       rdzv_endpoint=flags["--rdzv-endpoint"].replace("'\"$head\"'", head), out_dir=flags["--out"])
    assert torchrun_command(ours) == torchrun_command(theirs)
    assert (ours.strategy, ours.precision, ours.devices, ours.nodes) == (theirs.strategy, theirs.precision, 8, 2)


def _fake_slurm(tmp_path: Path, sbatch_body: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", sbatch_body), ("srun", "exit 0")):
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_a_partition_slurm_rejects_is_passed_through_with_slurm_s_own_message(tmp_path):
    env = _fake_slurm(tmp_path, 'echo "sbatch: error: invalid partition specified: nosuch" >&2\n'
                                'echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2\n'
                                "exit 1")
    proc = bench("sweep", "--strategies", "single", *TINY, "--executor", "slurm", "--partition", "nosuch",
                 "--out", tmp_path / "s", env=env)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "Invalid partition name specified" in err and "refused" in err


def test_without_sbatch_the_slurm_executor_says_so_before_submitting_anything(tmp_path):
    proc = bench("sweep", "--strategies", "single", *TINY, "--executor", "slurm", "--out", tmp_path / "s",
                 env={"PATH": os.path.dirname(sys.executable)})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no sbatch" in proc.stderr, proc.stderr
    assert not (tmp_path / "s" / "jobs").exists() and not (tmp_path / "s" / "sweep.json").exists()
    proc = bench("tune", "--space", "tune-cpu", "--executor", "slurm", "--out", tmp_path / "t",
                 env={"PATH": os.path.dirname(sys.executable)})
    assert proc.returncode == 2 and "no sbatch" in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not (tmp_path / "t").exists()
    proc = bench("tune", "--space", "tune-cpu", "--executor", "submitit-local", "--budget", "soon",
                 "--out", tmp_path / "t")
    assert proc.returncode == 2 and "--budget soon" in proc.stderr and not (tmp_path / "t").exists()  # not submitted


def _skipped_only(**run):
    from bench.sweep import SweepSpec

    return SweepSpec(strategies=["ddp"], gpus=[64], run={"size": "tiny", "device": "cpu", **run})  # 64 CPU workers: skipped


def test_a_folder_holding_another_sweep_or_a_running_one_is_refused(tmp_path):
    from bench.sweep import run_sweep

    run_sweep(_skipped_only(), str(tmp_path), device_type="cpu")
    run_sweep(_skipped_only(), str(tmp_path), device_type="cpu", resume=True)  # the same sweep again: fine
    with pytest.raises(ConfigError, match="holds another sweep"):
        run_sweep(_skipped_only(epochs=3), str(tmp_path), device_type="cpu")
    with open(tmp_path / ".sweep.lock", "a+") as lock:  # another sweep holds the folder now
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="another bench sweep .* is running in this folder"):
            run_sweep(_skipped_only(), str(tmp_path), device_type="cpu")
    proc = bench("sweep", "--strategies", "ddp", "--gpus", "64", "--size", "tiny", "--epochs", "3", "--device", "cpu",
                 "--out", tmp_path)
    assert proc.returncode == 2 and "holds another sweep" in proc.stderr and "Traceback" not in proc.stderr


def test_executor_settings_come_from_options_or_the_toml_and_bad_ones_get_one_line(tmp_path):
    from bench.executors import executor_spec
    from bench.sweep import load_spec

    toml = tmp_path / "s.toml"
    toml.write_text('strategies = ["ddp"]\ngpus = [8]\n[executor]\nkind = "slurm"\npartition = "a100"\n'
                    'account = "proj"\ntime = "2h"\ngpus_per_node = 4\n')
    spec = load_spec(str(toml))
    ex = executor_spec(None, spec.executor, partition="h100")
    assert (ex.kind, ex.partition, ex.account, ex.time_min, ex.gpus_per_node) == ("slurm", "h100", "proj", 120, 4)
    with pytest.raises(ConfigError, match="unknown keys"):
        executor_spec(None, {"queue": "x"})
    with pytest.raises(ConfigError, match="use one of local, submitit-local, slurm"):
        executor_spec("pbs", {})
    with pytest.raises(ConfigError, match="add --executor slurm"):
        executor_spec(None, {}, partition="gpu")
    with pytest.raises(ConfigError, match="partition: SLURM settings; submitit-local"):
        executor_spec("submitit-local", {}, partition="gpu")
    assert executor_spec("submitit-local", {}, time="90m").time_min == 90
    with pytest.raises(ConfigError, match="--time soon"):
        executor_spec("slurm", {}, time="soon")
    proc = bench("sweep", "--partition", "gpu", "--out", tmp_path / "x")
    assert proc.returncode == 2 and "add --executor slurm" in proc.stderr and "Traceback" not in proc.stderr
    proc = bench("sweep", "--status", tmp_path / "nothing")
    assert proc.returncode == 2 and "no sweep there" in proc.stderr


def test_slurm_cells_span_whole_nodes_and_skip_by_validity_not_by_the_login_node_s_devices():
    from bench.executors import executor_spec, place, why_not
    from bench.sweep import SweepSpec, expand

    ex = executor_spec("slurm", {"gpus_per_node": 4})
    spec = SweepSpec(strategies=["ddp", "fsdp"], gpus=[4, 8, 16, 6], run={"device": "cuda"})
    cells = {c.key: c for c in expand(spec, "cuda", "unused", why_not=why_not(ex), place=lambda c: place(c, ex))}
    nodes = {k: c.cfg.nodes for k, c in cells.items() if not c.skip_reason}
    assert nodes["cnn-ddp-4x-fp32-eager-weak-b32-r0"] == 1 and nodes["cnn-ddp-16x-fp32-eager-weak-b32-r0"] == 4
    assert nodes["cnn-fsdp-8x-fp32-eager-weak-b32-r0"] == 2
    assert "whole nodes of 4" in cells["cnn-ddp-6x-fp32-eager-weak-b32-r0"].skip_reason



class _Bar:
    def start(self, key): ...

    def note(self, line): ...

    def advance(self): ...


def test_a_preempted_job_is_requeued_and_its_cell_runs_again_to_a_result(tmp_path, monkeypatch):
    """SIGUSR2 to a running job's task is what SLURM's preemption (and submitit's LocalExecutor)
    sends: submitit checkpoints the callable (CellJob is Checkpointable) and requeues it; the cell
    must then run again, in the same job, to an ok result."""
    from bench.executors import ExecutorSpec, Jobs
    from bench.sweep import SweepSpec, expand

    spec = SweepSpec(strategies=["single"], gpus=[1], run={"size": "tiny", "epochs": 2, "batch_size": 4,
                                                           "model_size": "small", "device": "cpu"})
    cells = expand(spec, "cpu", str(tmp_path))
    states: dict = {}
    mark = tmp_path / "training"
    monkeypatch.setenv("EMOTION_BENCH_FAULT", "mark:0:1")  # the job's environment is this one
    monkeypatch.setenv("EMOTION_BENCH_MARK", str(mark))
    jobs = Jobs(ExecutorSpec("submitit-local"), str(tmp_path), states, lambda: None, _Bar())
    jobs.submit(cells)
    job = jobs.waiting[cells[0].key]

    def task():
        for p in psutil.Process(int(job.job_id)).children():
            try:
                if p.status() != psutil.STATUS_ZOMBIE and "submitit.core._submit" in " ".join(p.cmdline()):
                    return p
            except psutil.Error:  # a task that has just ended
                pass
        return None

    first = _wait_for(task)
    _wait_for(mark.exists)  # the cell is training
    mark.unlink()
    first.send_signal(signal.SIGUSR2)
    # requeued: the job's controller starts the task again, a new process for the same cell
    _wait_for(lambda: (p := task()) is not None and p.pid != first.pid)
    assert jobs.wait() == 0, states
    row = states[cells[0].key]
    assert row["state"] == "done" and row["job_id"] == job.job_id
    assert "this job is preempted" in job.paths.stderr.read_text()
    assert mark.exists()  # the second run trained again
    assert json.loads((tmp_path / f"{cells[0].key}.json").read_text())["status"] == "ok"


def test_alike_slurm_cells_go_in_as_one_job_array_each(monkeypatch, tmp_path):
    """The submission itself, against a recording stand-in for submitit's SlurmExecutor: cells that
    ask for the same nodes and GPUs share one array; the manifest's rows get each job's id."""
    import bench.executors as ex
    from bench.sweep import SweepSpec, expand

    calls = []

    class Recorder:
        params: dict = {}

        def update_parameters(self, **params):
            self.params = params

        def map_array(self, fn, args):
            calls.append((self.params["nodes"], self.params.get("gpus_per_node"), len(args)))
            return [type("J", (), {"job_id": f"{len(calls)}_{i}"})() for i in range(len(args))]

        def submit(self, fn, arg):
            return self.map_array(fn, [arg])[0]

    monkeypatch.setattr(ex, "make_executor", lambda spec, folder: Recorder())
    spec = ex.executor_spec("slurm", {"gpus_per_node": 4})
    cells = expand(SweepSpec(strategies=["ddp", "fsdp"], gpus=[4, 8], run={"device": "cuda"}), "cuda", str(tmp_path),
                   why_not=ex.why_not(spec, "cuda"), place=lambda c: ex.place(c, spec))
    states: dict = {}
    jobs = ex.Jobs(spec, str(tmp_path), states, lambda: None, _Bar())
    jobs.submit([c for c in cells if not c.skip_reason])
    assert sorted(calls) == [(1, 1, 1), (1, 4, 2), (2, 4, 2)]  # single; ddp and fsdp x4; ddp and fsdp x8
    assert {r["state"] for r in states.values()} == {"running"} and len({r["job_id"] for r in states.values()}) == 5
