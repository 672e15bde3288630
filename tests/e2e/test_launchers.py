"""Every supported launcher runs a real (tiny) `megaface train` on 2 CPU ranks; the launch scripts build the
commands they document.

Each training case starts a fresh job (launcher, 2 ranks, DeepSpeed engine, 3 iterations of a tiny
MobileFaceNet on a few synthetic identities) and checks the exit code and the `train: iter N, loss L,
throughput: T` lines. The 2-rank jobs see the same global batches, so their losses must agree across
launchers. Extra launcher variants are marked slow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megaface.config import load_config
from tests.conftest import ROOT, free_port
from tests.support.launch_jobs import (
    JOB_TIMEOUT_S,
    LAUNCH,
    QUICKSTART,
    check_same_losses,
    check_training,
    job_env,
    launcher_args,
    run_job,
)

SEED_SCRIPTS = {
    "train_mobilefacenet_dp.sh": "faces_emore_mobilefacenet_dp.yaml",
    "train_mobilefacenet_mp.sh": "faces_emore_mobilefacenet_mp.yaml",
    "train_r100_dp.sh": "faces_emore_r100_dp.yaml",
    "train_r100_mp_pfc.sh": "faces_emore_r100_mp_pfc.yaml",
    "train_ms1mv3_r100.sh": "ms1mv3_r100.yaml",
    "train_glint360k_r100_pfc.sh": "glint360k_r100_pfc.yaml",
}


@pytest.mark.timeout(JOB_TIMEOUT_S + 30)
def test_single_process(tmp_path: Path, synthetic_cache: Path) -> None:
    proc = run_job([sys.executable, "-m", "megaface", "train", *launcher_args(tmp_path / "out", synthetic_cache)])
    check_training(proc, world_size=1)
    assert (tmp_path / "out" / "checkpoints" / "latest").is_file()


@pytest.mark.timeout(JOB_TIMEOUT_S + 30)
def test_deepspeed_hostfile(tmp_path: Path, synthetic_cache: Path, reference_losses: list[float]) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    # the form users type: deepspeed appends --local_rank=N before `train`, and LOCAL_RANK to the env
    proc = run_job(["deepspeed", "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1",
                    "--master_port", str(free_port()), "--module", "megaface", "train",
                    *launcher_args(tmp_path / "out", synthetic_cache)])
    check_same_losses(check_training(proc, world_size=2), reference_losses)


@pytest.mark.timeout(JOB_TIMEOUT_S + 30)
def test_torchrun_through_launch_script(tmp_path: Path, synthetic_cache: Path, reference_losses: list[float]) -> None:
    """launch/train.sh with LAUNCHER=torchrun: the script's command line, run for real."""
    env = job_env(LAUNCHER="torchrun", GPUS_PER_NODE="2", MASTER_PORT=str(free_port()), CONFIG=str(QUICKSTART))
    args = launcher_args(tmp_path / "out", synthetic_cache)[2:]  # the script passes --config itself
    proc = run_job(["bash", str(LAUNCH / "train.sh"), *args], env)
    check_same_losses(check_training(proc, world_size=2), reference_losses)


def _mpi_missing() -> str | None:
    if shutil.which("mpirun") is None:
        return "OpenMPI's mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev)"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install mpi4py)"
    return None


@pytest.mark.timeout(JOB_TIMEOUT_S + 30)
@pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))
def test_mpirun(tmp_path: Path, synthetic_cache: Path, reference_losses: list[float]) -> None:
    # Loopback only: shared memory between the two ranks, and OpenMPI's own wire-up on lo.
    cmd = ["mpirun", "--allow-run-as-root", "-np", "2", "--mca", "btl", "self,vader",
           "--mca", "oob_tcp_if_include", "lo", sys.executable, "-m", "megaface", "train",
           *launcher_args(tmp_path / "out", synthetic_cache)]
    check_same_losses(check_training(run_job(cmd), world_size=2), reference_losses)


# ---- launch scripts: fast checks, no training ----------------------------------------------------------

def dry_run(script: str, args: list[str] = (), **env: str) -> str:
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=ROOT, capture_output=True, text=True,
                          env=job_env(DRY_RUN="1", **env), timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_scripts_parse() -> None:
    scripts = sorted(LAUNCH.glob("*.sh"))
    assert len(scripts) >= 10, scripts
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"
        assert os.access(script, os.X_OK), f"{script.name} is not executable"


@pytest.mark.parametrize("script, config", sorted(SEED_SCRIPTS.items()))
def test_seed_scripts_dry_run(script: str, config: str) -> None:
    out = dry_run(script, ["--max-steps", "5", "--optim.lr=0.05"], GPUS_PER_NODE="8")
    assert out.startswith("deepspeed --num_nodes 1 --num_gpus 8 --master_port 29500 --master_addr 127.0.0.1 "
                          "--no_ssh_check --no_local_rank --module megaface train --config "), out
    assert out.split("--config ")[1].split()[0] == str(LAUNCH / "configs" / config)
    assert out.endswith("--max-steps 5 --optim.lr=0.05"), out  # "$@" last and unchanged
    assert "CUDA_VISIBLE_DEVICES" not in out


def test_launcher_variants_dry_run(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=4\nnode-b slots=4\n")
    common = dict(NODES="2", GPUS_PER_NODE="4", HOSTFILE=str(hostfile), PER_GPU_BATCH="32")
    ds = dry_run("train_r100_mp_pfc.sh", **common)
    assert f"deepspeed --hostfile {hostfile} --num_nodes 2 --num_gpus 4 --master_port 29500 --no_local_rank" in ds
    assert "--no_ssh_check" not in ds and "--master_addr" not in ds  # DeepSpeed checks ssh, finds the address
    assert "--ds.train_micro_batch_size_per_gpu=32" in ds
    mpi = dry_run("train_r100_mp_pfc.sh", LAUNCHER="mpirun", MASTER_ADDR="10.0.0.1", NCCL_SOCKET_IFNAME="eth0",
                  **common)
    assert mpi.startswith("mpirun -np 8 ")
    assert f"--hostfile {hostfile} --map-by ppr:4:node" in mpi
    for forwarded in ("-x MASTER_ADDR", "-x MASTER_PORT", "-x NCCL_SOCKET_IFNAME", "-x PATH"):
        assert forwarded in mpi, mpi
    assert "-m megaface train --config" in mpi
    tr = dry_run("train_r100_mp_pfc.sh", LAUNCHER="torchrun", MASTER_ADDR="10.0.0.1", NODE_RANK="1", **common)
    assert tr.startswith("torchrun --nnodes 2 --nproc_per_node 4 --node_rank 1 --master_addr 10.0.0.1 "
                         "--master_port 29500 -m megaface train"), tr
    data = dry_run("train.sh", DATA_DIR="/data/faces emore", LAUNCHER="python", CONFIG=str(QUICKSTART))
    assert "--data.path=/data/faces\\ emore" in data and "lfw.bin" in data


@pytest.mark.parametrize("env, message", [
    (dict(HOSTFILE="/nonexistent/hostfile"), "HOSTFILE='/nonexistent/hostfile' does not exist"),
    (dict(NODES="2"), "NODES=2 needs HOSTFILE"),
    (dict(LAUNCHER="srun"), "LAUNCHER='srun' is not one of"),
    (dict(GPUS_PER_NODE="two"), "GPUS_PER_NODE='two' must be"),
    (dict(CONFIG="/nonexistent.yaml"), "CONFIG='/nonexistent.yaml' does not exist"),
    (dict(DS_CONFIG="ds_configs/zero9.json"), "DS_CONFIG='ds_configs/zero9.json' does not exist"),
    (dict(LAUNCHER="torchrun", NODES="2"), "needs MASTER_ADDR"),
])
def test_launch_script_errors(env: dict[str, str], message: str) -> None:
    env.setdefault("CONFIG", str(QUICKSTART))
    proc = subprocess.run(["bash", str(LAUNCH / "train.sh")], cwd=ROOT, capture_output=True, text=True,
                          env=job_env(DRY_RUN="1", **env), timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, (proc.returncode, proc.stderr)
    assert proc.stdout == ""


def test_recipes_load() -> None:
    """Every YAML recipe loads with the trainer's schema and names an existing DeepSpeed JSON."""
    expected_classes = {"faces_emore": 85742, "ms1mv3": 93431, "glint360k": 360232}
    recipes = sorted((LAUNCH / "configs").glob("*.yaml"))
    assert len(recipes) >= 10, recipes
    for path in recipes:
        cfg = load_config(path)
        assert cfg.train.ds_config and Path(cfg.train.ds_config).is_file(), path.name
        for prefix, classes in expected_classes.items():
            if path.name.startswith(prefix):
                assert cfg.head.num_classes == classes, path.name
                assert len(cfg.validation.bins) == 3 and cfg.validation.interval == 2000, path.name


# ---- slow: more launcher variants ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT_S + 30)
def test_deepspeed_num_gpus_without_hostfile(tmp_path: Path, synthetic_cache: Path) -> None:
    proc = run_job(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "megaface",
                    "train", *launcher_args(tmp_path / "out", synthetic_cache)])
    check_training(proc, world_size=2)


@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT_S + 30)
@pytest.mark.parametrize("ds_config", ["zero1_bf16.json", "zero2_fp32.json", "zero3_fp32.json",
                                       "zero2_offload_bf16.json"])
def test_deepspeed_script_with_zero_variants(tmp_path: Path, synthetic_cache: Path, ds_config: str) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env = job_env(HOSTFILE=str(hostfile), GPUS_PER_NODE="2", MASTER_PORT=str(free_port()),
                  CONFIG=str(QUICKSTART), DS_CONFIG=str(ROOT / "ds_configs" / ds_config))
    proc = run_job(["bash", str(LAUNCH / "train.sh"), *launcher_args(tmp_path / "out", synthetic_cache)[2:]], env)
    check_training(proc, world_size=2)


@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT_S + 30)
@pytest.mark.parametrize("script", ["train_mobilefacenet_dp.sh", "train_mobilefacenet_mp.sh"])
def test_seed_script_runs_on_synthetic(tmp_path: Path, synthetic_cache: Path, script: str) -> None:
    """A seed script for real, its recipe pointed at synthetic data (data-parallel and model-parallel FC7)."""
    env = job_env(LAUNCHER="torchrun", GPUS_PER_NODE="2", MASTER_PORT=str(free_port()))
    args = launcher_args(tmp_path / "out", synthetic_cache)[2:] + [
        "--data.source=synthetic", "--head.num_classes=null", "--validation.bins=[]",
        "--model.network=mobilefacenet_tiny", "--train.ds_config=" + str(ROOT / "ds_configs/zero0_fp32.json")]
    check_training(run_job(["bash", str(LAUNCH / script), *args], env), world_size=2)


def run_two_nodes(cmds: list[list[str]], envs: list[dict[str, str]]) -> subprocess.CompletedProcess:
    """Start one launcher per emulated node at once; return node 0's result (rank 0 prints the log)."""
    start = time.monotonic()
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, env in zip(cmds, envs, strict=False)]
    outs = [p.communicate(timeout=JOB_TIMEOUT_S) for p in procs]
    assert procs[1].returncode == 0, f"node 1 exit code {procs[1].returncode}\n{outs[1][1][-4000:]}"
    result = subprocess.CompletedProcess(cmds[0], procs[0].returncode, *outs[0])
    result.wall_s = time.monotonic() - start  # type: ignore[attr-defined]
    return result


@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT_S + 30)
def test_deepspeed_two_nodes_without_ssh(tmp_path: Path, synthetic_cache: Path, reference_losses: list[float]) -> None:
    """docs/multinode.md's no-ssh form: one `deepspeed --no_ssh --node_rank i` per node (two 'nodes' here)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    cmds = [["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(i), "--master_addr",
             "127.0.0.1", "--master_port", port, "--no_local_rank", "--module", "megaface", "train",
             *launcher_args(tmp_path / "out", synthetic_cache)] for i in (0, 1)]
    proc = run_two_nodes(cmds, [job_env(), job_env()])
    check_same_losses(check_training(proc, world_size=2), reference_losses)


@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT_S + 30)
def test_torchrun_two_nodes_through_launch_script(tmp_path: Path, synthetic_cache: Path, reference_losses: list[float]) -> None:
    """LAUNCHER=torchrun NODES=2 NODE_RANK=i: the script started once per node (two 'nodes' here)."""
    port = str(free_port())
    envs = [job_env(LAUNCHER="torchrun", NODES="2", NODE_RANK=str(i), GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=port, CONFIG=str(QUICKSTART)) for i in (0, 1)]
    cmd = ["bash", str(LAUNCH / "train.sh"), *launcher_args(tmp_path / "out", synthetic_cache)[2:]]
    check_same_losses(check_training(run_two_nodes([cmd, cmd], envs), world_size=2), reference_losses)


@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT_S + 30)
@pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))
def test_mpirun_through_launch_script_with_hostfile(tmp_path: Path, synthetic_cache: Path, reference_losses: list[float]) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env = job_env(LAUNCHER="mpirun", HOSTFILE=str(hostfile), GPUS_PER_NODE="2", MASTER_PORT=str(free_port()),
                  CONFIG=str(QUICKSTART), LAUNCHER_ARGS="--mca btl self,vader --mca oob_tcp_if_include lo")
    proc = run_job(["bash", str(LAUNCH / "train.sh"), *launcher_args(tmp_path / "out", synthetic_cache)[2:]], env)
    check_same_losses(check_training(proc, world_size=2), reference_losses)
