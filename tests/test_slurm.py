"""SLURM: how a rank reads srun's variables (always run), and launch/slurm/train.sbatch on a real one-machine
SLURM cluster (opt-in: `pytest -m slurm`; needs root and Debian's slurm-wlm + munge, never installed here).

The cluster (launch/slurm/local_cluster.sh) declares 8 CPUs on whatever the machine has; every run is a tiny
disaggregated one: 2 ZeRO-3 trainer ranks + 2 tiny source models, one rank each (world size 4).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from experiments.local_runs import free_port
from fusion.topology import LaunchEnv, TopologyError, slurm_tasks_per_node
from test_train_zero3 import shared_memory_names, write_config

SBATCH = ROOT / "launch/slurm/train.sbatch"
CLUSTER = ROOT / "launch/slurm/local_cluster.sh"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


# -- what a rank reads from srun (no cluster needed) ---------------------------------------------------

def test_tasks_per_node_expands_slurms_compressed_form():
    assert slurm_tasks_per_node("4") == [4]
    assert slurm_tasks_per_node("3(x2),1") == [3, 3, 1]
    assert slurm_tasks_per_node("2,5(x3)") == [2, 5, 5, 5]


def test_launch_env_under_srun_with_ntasks_alone_or_per_node():
    # `sbatch --ntasks 7` placed as 3 + 3 + 1 tasks: no SLURM_NTASKS_PER_NODE, the step's layout says it.
    task = {"SLURM_PROCID": "4", "SLURM_NTASKS": "7", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
            "SLURM_STEP_TASKS_PER_NODE": "3(x2),1", "MASTER_ADDR": "node0", "MASTER_PORT": "10000"}
    env = LaunchEnv.from_mapping(task)
    assert (env.rank, env.world_size, env.local_rank, env.local_size) == (4, 7, 1, 3)
    assert LaunchEnv.from_mapping({**task, "SLURM_NODEID": "2", "SLURM_PROCID": "6", "SLURM_LOCALID": "0"}).local_size == 1
    # Threads: the node's CPUs shared by its ranks, unless --cpus-per-task says how many this task has.
    assert env.cpu_threads(48) == 16
    assert LaunchEnv.from_mapping({**task, "SLURM_CPUS_PER_TASK": "5"}).cpu_threads(48) == 5
    # deepspeed / torchrun inside an allocation: their own variables win.
    assert LaunchEnv.from_mapping({**task, "LOCAL_SIZE": "8"}).local_size == 8
    with pytest.raises(TopologyError, match="malformed launcher environment: SLURM_NODEID=3 but .* has 3 node"):
        LaunchEnv.from_mapping({**task, "SLURM_NODEID": "3"})


def test_gpu_index_for_whole_nodes_and_one_gpu_per_task():
    env = LaunchEnv(rank=5, world_size=8, local_rank=5, master_addr="node0", master_port=10000, local_size=8)
    assert env.gpu_index(visible_gpus=8) == 5  # whole node: every task sees all GPUs
    assert env.gpu_index(visible_gpus=1) == 0  # --gpus-per-task=1: the task's GPU is its cuda:0
    with pytest.raises(TopologyError, match="local rank 5 but this process sees 2 GPU"):
        env.gpu_index(visible_gpus=2)


# -- a real one-machine cluster -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """SLURM_CONF of a running local cluster; every daemon, job and spool folder is gone afterwards."""
    missing = [tool for tool in ("sbatch", "slurmctld", "slurmd", "munged") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: apt-get install -y slurm-wlm munge (as root) to run these")
    if os.geteuid() != 0:
        pytest.skip("slurmd needs root")
    state = tmp_path_factory.mktemp("slurm") / "cluster"
    started = subprocess.run(["bash", str(CLUSTER), "start", str(state), "8"], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "SLURMCTLD_PORT": str(free_port())})
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield str(state / "slurm.conf")
    finally:
        stopped = subprocess.run(["bash", str(CLUSTER), "stop", str(state)], capture_output=True, text=True, timeout=180)
        assert stopped.returncode == 0, stopped.stderr
        assert not state.exists()


def slurm(conf: str, *command: str, cwd: Path | None = None) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=cwd, env={**os.environ, "SLURM_CONF": conf})
    assert result.returncode == 0, result.stderr
    return result.stdout


def submit(conf: str, *args: str, cwd: Path) -> int:
    return int(slurm(conf, "sbatch", "--parsable", *map(str, args), cwd=cwd).strip().split(";")[0])


def job_field(conf: str, job: int, field: str) -> str:
    return slurm(conf, "scontrol", "show", "job", "-o", str(job)).split(f" {field}=")[1].split()[0]


def wait_job(conf: str, job: int, timeout: float = 600) -> tuple[str, str]:
    """(JobState, ExitCode) once the job has ended."""
    deadline = time.monotonic() + timeout
    while (state := job_field(conf, job, "JobState")) not in ENDED:
        assert time.monotonic() < deadline, f"job {job} still {state} after {timeout} s"
        time.sleep(1)
    return state, job_field(conf, job, "ExitCode")


def wait_for_line(log: Path, text: str, conf: str, job: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not (log.is_file() and text in log.read_text()):
        assert job_field(conf, job, "JobState") in ("PENDING", "RUNNING"), f"job {job} ended before {text!r} in {log}"
        assert time.monotonic() < deadline, f"no {text!r} in {log} after {timeout} s"
        time.sleep(0.5)


def job_processes(job: int) -> dict[int, list[str]]:
    """pid -> command line of every process of the job (found by SLURM_JOB_ID in its environment)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:  # gone meanwhile
                continue
            if f"SLURM_JOB_ID={job}".encode() in environ:
                found[int(entry.name)] = cmdline
    return found


def rank_process(job: int, rank: int) -> int:
    """The python process of one rank (not the shell around it that records its exit code)."""
    for pid in job_processes(job):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if f"SLURM_PROCID={rank}".encode() in environ and "python" in Path(cmdline[0].decode()).name:
            return pid
    raise AssertionError(f"no python process of rank {rank} in job {job}")


def tiny_run(tmp_path: Path, name: str, tiny_target, tiny_sources, tiny_corpus, steps: int) -> dict:
    """A disaggregated run config: trainer ranks 0-1, source `bpe` rank 2, source `wordpiece` rank 3."""
    sources = [{"name": path.name, "path": str(path), "batch_size": 2} for path in tiny_sources]
    path = write_config(tmp_path, name, 2, tiny_target, tiny_corpus, sources=sources,
                        topology={"placement": "disaggregated", "request_timeout_s": 20},
                        fusion={"mode": "all_uniform", "lam": 0.5}, micro_batch_size=2, max_steps=steps, lr=3e-3,
                        warmup_steps=1, eval_batches=1)
    return yaml.safe_load(path.read_text())


@pytest.mark.slurm
def test_job_with_ntasks_alone_from_another_directory_completes(cluster, tmp_path, tiny_target, tiny_sources, tiny_corpus):
    """`--ntasks 4` only, submitted from elsewhere with --chdir: relative config and output paths resolve
    in the job's working directory, the code is found from the script, rank logs land in the run's folder."""
    workdir, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    workdir.mkdir()
    elsewhere.mkdir()
    config = tiny_run(tmp_path, "ok", tiny_target, tiny_sources, tiny_corpus, steps=4)
    config["run"]["output_dir"] = "runs/ok"
    (workdir / "ok.yaml").write_text(yaml.safe_dump(config))
    repo_outputs = set(ROOT.glob("slurm-*.out"))

    started = time.monotonic()
    job = submit(cluster, "--ntasks", 4, "--cpus-per-task", 2, "--chdir", workdir, SBATCH, "ok.yaml", cwd=elsewhere)
    state, exit_code = wait_job(cluster, job)
    output = (workdir / f"slurm-{job}.out").read_text()
    print(f"\njob {job} (--ntasks 4 --cpus-per-task 2 --chdir): {state} {exit_code} in {time.monotonic() - started:.0f} s")
    run = workdir / "runs/ok"
    assert (state, exit_code) == ("COMPLETED", "0:0"), output + (run / f"logs/slurm-{job}/rank0.log").read_text()[-3000:]
    summary = json.loads((run / "result.json").read_text())
    assert summary["steps"] == 4 and not any(entry["down"] for entry in summary["sources"].values())
    assert (run / "model/config.json").is_file() and (run / "model/model.safetensors").is_file()
    logs = run / f"logs/slurm-{job}"
    assert sorted(path.name for path in logs.glob("rank*.log")) == [f"rank{rank}.log" for rank in range(4)]
    assert [(logs / f"rank{rank}.exit").read_text().strip() for rank in range(4)] == ["0"] * 4
    assert "step 4/4" in (logs / "rank0.log").read_text()
    assert "source wordpiece replica 0: served" in (logs / "rank3.log").read_text()
    assert f"rank logs: {logs}" in output and "finished 4 steps" in output
    assert not list(elsewhere.iterdir()) and set(ROOT.glob("slurm-*.out")) == repo_outputs


@pytest.mark.slurm
def test_wrong_task_count_fails_fast_naming_the_count(cluster, tmp_path, tiny_target, tiny_sources, tiny_corpus):
    """Also: the script given by a path relative to the submit directory still finds its repository."""
    config = tiny_run(tmp_path, "mismatch", tiny_target, tiny_sources, tiny_corpus, steps=4)
    started = time.monotonic()
    job = submit(cluster, "--ntasks", 3, "--chdir", tmp_path, "--output", tmp_path / "job.out",
                 SBATCH.relative_to(ROOT / "launch"), "mismatch.yaml", cwd=ROOT / "launch")
    assert wait_job(cluster, job, timeout=120) == ("FAILED", "2:0")
    print(f"\njob {job} (3 tasks for 4 ranks): FAILED 2:0 in {time.monotonic() - started:.0f} s")
    assert "needs 4 ranks but this job has 3 tasks; submit with --ntasks 4" in (tmp_path / "job.out").read_text()
    assert not Path(config["run"]["output_dir"]).exists()


@pytest.mark.slurm
def test_killed_source_job_still_completes(cluster, tmp_path, tiny_target, tiny_sources, tiny_corpus):
    """A source rank SIGKILLed mid-run: training finishes without it, so the job is COMPLETED (exit 0) and
    says which rank died."""
    steps = 16
    config = tiny_run(tmp_path, "killed", tiny_target, tiny_sources, tiny_corpus, steps=steps)
    run = Path(config["run"]["output_dir"])
    job = submit(cluster, "--nodes", 1, "--ntasks-per-node", 4, "--output", tmp_path / "job.out", SBATCH,
                 tmp_path / "killed.yaml", cwd=tmp_path)
    wait_for_line(run / f"logs/slurm-{job}/rank0.log", f"step 3/{steps}", cluster, job)
    os.kill(rank_process(job, 3), signal.SIGKILL)
    state, exit_code = wait_job(cluster, job)
    output = (tmp_path / "job.out").read_text()
    print(f"\njob {job} (--ntasks-per-node 4, rank 3 = source wordpiece killed at step 3): {state} {exit_code}")
    assert (state, exit_code) == ("COMPLETED", "0:0"), output
    summary = json.loads((run / "result.json").read_text())
    assert summary["steps"] == steps
    assert summary["sources"]["wordpiece"]["down"] and not summary["sources"]["bpe"]["down"]
    assert (run / "model/model.safetensors").is_file()
    assert "warning: training completed, but these ranks exited non-zero: rank 3 (137)" in output


@pytest.mark.slurm
def test_scancel_leaves_no_process_and_no_shared_memory(cluster, tmp_path, tiny_target, tiny_sources, tiny_corpus):
    steps = 2000
    config = tiny_run(tmp_path, "cancelled", tiny_target, tiny_sources, tiny_corpus, steps=steps)
    segments = shared_memory_names()
    job = submit(cluster, "--ntasks", 4, "--output", tmp_path / "job.out", SBATCH, tmp_path / "cancelled.yaml", cwd=tmp_path)
    wait_for_line(Path(config["run"]["output_dir"]) / f"logs/slurm-{job}/rank0.log", f"step 2/{steps}", cluster, job)
    assert len([cmd for cmd in job_processes(job).values() if "python" in Path(cmd[0]).name]) == 4
    cancelled = time.monotonic()
    slurm(cluster, "scancel", str(job))
    while job_processes(job) or shared_memory_names() - segments:
        assert time.monotonic() - cancelled < 60, (job_processes(job), shared_memory_names() - segments)
        time.sleep(0.1)
    print(f"\njob {job}: scancel at step >= 2; no process and no /dev/shm segment left after {time.monotonic() - cancelled:.1f} s")
    assert wait_job(cluster, job, timeout=60)[0] == "CANCELLED"
