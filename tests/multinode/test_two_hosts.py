"""`megaface train` across two real hosts (network namespaces with their own addresses and sshd; hosts.py).

No interface variable is set anywhere unless a case says so: each rank must advertise the address the other
host reaches it by, although the host name resolves to 127.0.1.1 on both hosts. Every 2-rank job sees the
same global batches as the single-host 2-rank run (`reference_losses`, tests/support/launch_jobs.py), and the
FC7 shards are exact across hosts, so the printed losses must be the same numbers, digit for digit.

Slow (each case is a real launcher + DeepSpeed job on a shared 2-core machine); skipped with the reason
where namespaces, root, OpenSSH's sshd (or, per case, pdsh or mpirun) are missing. The check runs when the
first case needs the hosts, not at collection. Run: `python -m pytest -q -m slow tests/multinode -rs`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port
from tests.multinode.hosts import ADDRS, IFACE, SSH_PORT, TwoHosts, missing, two_hosts
from tests.support.launch_jobs import JOB_TIMEOUT_S, TRAIN_LINE, check_training, job_env, launcher_args

pytestmark = pytest.mark.slow
NETWORK_LINE = re.compile(r"network: (GLOO_SOCKET_IFNAME)=(\S+)")
PDSH_MISSING = "pdsh is not installed (apt-get install -y pdsh): DeepSpeed's default multi-node launcher"


@pytest.fixture(scope="module")
def made_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoHosts]:
    if (why := missing()) is not None:
        pytest.skip(f"two hosts from network namespaces cannot be made: {why}")
    with two_hosts(tmp_path_factory.mktemp("hosts")) as made:
        yield made


@pytest.fixture
def hosts(made_hosts: TwoHosts) -> Iterator[TwoHosts]:
    """The two hosts, and after each case (passed, failed or timed out) no process of it left on them."""
    yield made_hosts
    made_hosts.reset()


def check_exact_losses(losses: list[float], reference: list[float]) -> None:
    """The printed losses (Python's shortest repr of each float) are those of the one-host run, exactly."""
    assert losses == reference, (losses, reference)


def host_env(hosts: TwoHosts, **extra: str) -> dict[str, str]:
    env = hosts.env(job_env(**extra))
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        env.pop(var, None)
    return env


def run_on_both(hosts: TwoHosts, cmd_for: list[list[str]], env: dict[str, str],
                timeout_s: float = JOB_TIMEOUT_S) -> list[subprocess.CompletedProcess]:
    """Start cmd_for[i] on host i at the same time; wait for both (bounded)."""
    procs = [subprocess.Popen(hosts.in_host(i, cmd), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i, cmd in enumerate(cmd_for)]
    start, results = time.monotonic(), []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, timeout_s - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        done.wall_s = time.monotonic() - start  # type: ignore[attr-defined]
        results.append(done)
    return results


# The commands of each case, built by the functions docs/multinode.md's table is checked against
# (test_docs_show_the_commands_run_here renders them with the doc's placeholders: $i, $PORT, $TINY, ...).
def torchrun_static(node_rank: int | str, port: int | str, args: list[str]) -> list[str]:
    return ["torchrun", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node_rank),
            "--master_addr", ADDRS[0], "--master_port", str(port), "-m", "megaface", "train", *args]


def torchrun_c10d(is_host: int | str, local_addr: str, port: int | str, args: list[str]) -> list[str]:
    # torchrun hosts the rendezvous store only where the endpoint matches the host name's addresses (here
    # 127.0.1.1), so node 0 is told (is_host); --local-addr is the address the rank-0 agent publishes as
    # MASTER_ADDR (its host name otherwise, which resolves to loopback on the other host)
    return ["torchrun", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"{ADDRS[0]}:{port}", "--rdzv-id", "mf-two-hosts", "--rdzv-conf", f"is_host={is_host}",
            "--local-addr", local_addr, "-m", "megaface", "train", *args]


def deepspeed_cmd(hostfile: str, port: int | str, args: list[str]) -> list[str]:
    return ["deepspeed", "--hostfile", hostfile, "--master_addr", ADDRS[0], "--master_port", str(port),
            "--ssh_port", str(SSH_PORT), "--module", "megaface", "train", *args]


MPI_FORWARDED = ("PATH", "PYTHONPATH", "DS_ACCELERATOR", "OMP_NUM_THREADS", "PYTHONUNBUFFERED", "MASTER_ADDR",
                 "MASTER_PORT")


def mpirun_cmd(python: str, args: list[str]) -> list[str]:
    return ["mpirun", "--allow-run-as-root", "-np", "2", "--host", f"{ADDRS[0]}:1,{ADDRS[1]}:1",
            "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", IFACE, "--mca", "oob_tcp_if_include", IFACE,
            *[x for var in MPI_FORWARDED for x in ("-x", var)], python, "-m", "megaface", "train", *args]


DS_ENV = f"DS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1\nGLOO_SOCKET_IFNAME={IFACE}\n"  # the deepspeed case's
SEED_DS_ENV = "DS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1\n"  # the seed script's: megaface chooses the interface
SEED_SCRIPT = "launch/train_r100_mp_pfc.sh"
SEED_TINY = ["--model.network=mobilefacenet_tiny", "--model.dropout=0", "--head.num_classes=40",
             "--data.source=synthetic", "--data.workers=1", "--train.threads=1"]  # then $TINY without --config


def seed_vars(hostfile: str, port: int | str) -> dict[str, str]:
    return {"NODES": "2", "GPUS_PER_NODE": "1", "HOSTFILE": hostfile, "MASTER_ADDR": ADDRS[0],
            "MASTER_PORT": str(port), "LAUNCHER_ARGS": f"--ssh_port {SSH_PORT}"}


def assert_chose_interface(out: str, ranks: int = 2) -> None:
    chosen = NETWORK_LINE.findall(out)
    assert chosen == [("GLOO_SOCKET_IFNAME", IFACE)] * ranks, out[-4000:]


@pytest.mark.timeout(JOB_TIMEOUT_S * 2 + 60)
def test_torchrun_static(hosts: TwoHosts, tmp_path: Path, synthetic_cache: Path,
                         reference_losses: list[float]) -> None:
    """The issue's case: it failed in gloo's connectFullMesh (each rank advertised 127.0.0.1)."""
    port, args = free_port(), launcher_args(tmp_path / "out", synthetic_cache)
    node0, node1 = run_on_both(hosts, [torchrun_static(0, port, args), torchrun_static(1, port, args)],
                               host_env(hosts))
    assert node1.returncode == 0, (node1.stdout + node1.stderr)[-6000:]
    check_exact_losses(check_training(node0, world_size=2), reference_losses)
    assert_chose_interface(node0.stderr + node1.stderr)


@pytest.mark.timeout(JOB_TIMEOUT_S * 2 + 60)
def test_torchrun_c10d(hosts: TwoHosts, tmp_path: Path, synthetic_cache: Path,
                       reference_losses: list[float]) -> None:
    port, args = free_port(), launcher_args(tmp_path / "out", synthetic_cache)
    cmds = [torchrun_c10d(int(i == 0), ADDRS[i], port, args) for i in range(2)]
    node0, node1 = run_on_both(hosts, cmds, host_env(hosts))
    assert node0.returncode == 0 and node1.returncode == 0, (node0.stdout + node0.stderr + node1.stderr)[-6000:]
    # under c10d the node ranks follow the order of arrival: rank 0's train lines are on either host
    main = node0 if TRAIN_LINE.search(node0.stdout) else node1
    check_exact_losses(check_training(main, world_size=2), reference_losses)
    assert_chose_interface(node0.stderr + node1.stderr)


def without_pdsh_prefix(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """pdsh prefixes every line of host H with `H: `; the train-line checks read the lines without it."""
    strip = re.compile(r"^(?:" + "|".join(re.escape(a) for a in ADDRS) + r"): ", re.M)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, strip.sub("", proc.stdout),
                                       strip.sub("", proc.stderr))
    done.wall_s = 0.0  # type: ignore[attr-defined]
    return done


def write_hostfile(tmp_path: Path) -> Path:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{addr} slots=1\n" for addr in ADDRS))
    return hostfile


@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
def test_deepspeed_hostfile_over_ssh(hosts: TwoHosts, tmp_path: Path, synthetic_cache: Path,
                                     reference_losses: list[float]) -> None:
    """`deepspeed --hostfile` on host 0 starts both ranks over pdsh/ssh; `.deepspeed_env` in the working
    directory reaches the remote ranks: DeepSpeed exports its lines in the pdsh command, and its
    GLOO_SOCKET_IFNAME stops megaface from choosing on both hosts (no network line; without it each host
    prints one, as in test_seed_script_two_nodes)."""
    if shutil.which("pdsh") is None:
        pytest.skip(PDSH_MISSING)
    (tmp_path / ".deepspeed_env").write_text(DS_ENV)
    cmd = deepspeed_cmd(str(write_hostfile(tmp_path)), free_port(), launcher_args(tmp_path / "out", synthetic_cache))
    proc = subprocess.run(hosts.in_host(0, cmd), cwd=tmp_path, env=host_env(hosts), capture_output=True,
                          text=True, timeout=JOB_TIMEOUT_S)
    out = proc.stdout + proc.stderr
    check_exact_losses(check_training(without_pdsh_prefix(proc), world_size=2), reference_losses)
    host1 = re.escape(ADDRS[1])  # pdsh prefixes host 1's lines with its address
    assert re.search(rf"^{host1}: .*nnodes=2, num_local_procs=1, node_rank=1$", out, re.M), out[-4000:]
    assert re.search(rf"^{host1}: .*Process \d+ exits successfully", out, re.M), out[-4000:]
    assert re.search(rf"pdsh .*-w {re.escape(ADDRS[0])},{re.escape(ADDRS[1])} .*"
                     rf"export GLOO_SOCKET_IFNAME={IFACE};", out), out[-4000:]  # DeepSpeed's logged command
    assert NETWORK_LINE.search(out) is None, out[-4000:]  # the user's variable, from .deepspeed_env, was kept


@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
def test_mpirun_hosts(hosts: TwoHosts, tmp_path: Path, synthetic_cache: Path,
                      reference_losses: list[float]) -> None:
    if shutil.which("mpirun") is None:
        pytest.skip("Open MPI's mpirun is not installed (apt-get install -y openmpi-bin libopenmpi-dev)")
    env = host_env(hosts, MASTER_ADDR=ADDRS[0], MASTER_PORT=str(free_port()))
    cmd = mpirun_cmd(sys.executable, launcher_args(tmp_path / "out", synthetic_cache))
    proc = subprocess.run(hosts.in_host(0, cmd), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S)
    proc.wall_s = 0.0  # type: ignore[attr-defined]
    check_exact_losses(check_training(proc, world_size=2), reference_losses)
    assert_chose_interface(proc.stdout + proc.stderr)  # one line per host: the ranks ran on both


def script_env(hosts: TwoHosts, tmp_path: Path, **extra: str) -> dict[str, str]:
    return host_env(hosts, **seed_vars(str(write_hostfile(tmp_path)), free_port()), **extra)


@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
def test_seed_script_two_nodes(hosts: TwoHosts, tmp_path: Path, synthetic_cache: Path,
                               reference_losses: list[float]) -> None:
    """launch/train_r100_mp_pfc.sh with NODES=2 and the nodes' addresses: DRY_RUN prints the deepspeed
    command, the real run trains (the seed's r100 recipe with the quickstart's tiny settings on top)."""
    if shutil.which("pdsh") is None:
        pytest.skip(PDSH_MISSING)
    (tmp_path / ".deepspeed_env").write_text(SEED_DS_ENV)
    script = str(ROOT / SEED_SCRIPT)
    args = [*SEED_TINY, *launcher_args(tmp_path / "out", synthetic_cache)[2:]]
    dry = subprocess.run(hosts.in_host(0, [script, *args]), cwd=tmp_path, capture_output=True, text=True,
                         env=script_env(hosts, tmp_path, DRY_RUN="1"), timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert re.search(rf"deepspeed --hostfile \S+ --num_nodes 2 --num_gpus 1 .*--master_addr {ADDRS[0]}",
                     dry.stdout), dry.stdout
    assert f"--ssh_port {SSH_PORT}" in dry.stdout and "--no_ssh_check" not in dry.stdout, dry.stdout
    proc = subprocess.run(hosts.in_host(0, [script, *args]), cwd=tmp_path, capture_output=True, text=True,
                          env=script_env(hosts, tmp_path), timeout=JOB_TIMEOUT_S)
    check_training(without_pdsh_prefix(proc), world_size=2)
    out = proc.stdout + proc.stderr
    assert_chose_interface(out)
    assert re.search(rf"^{re.escape(ADDRS[1])}: \[rank 1\] network: GLOO_SOCKET_IFNAME={IFACE}", out, re.M), out[-4000:]


LOSS_TIMEOUT_S = 15  # train.collective_timeout_s of the node-loss case
# whichever notices first: the heartbeat (host 1's rank stopped beating) or gloo (a collective timed out);
# both name host 1 by its address, as "address (host name)" (the host name is the same on both hosts)
LOSS_LINES = (
    re.compile(rf"megaface train: error: rank 0: rank 1 \(pid \d+ on {re.escape(ADDRS[1])} \(\S+\)\) sent no "
               rf"heartbeat for \d+ s \(train.collective_timeout_s={LOSS_TIMEOUT_S}\)"),
    re.compile(rf"megaface train: error: a collective waited more than train.collective_timeout_s={LOSS_TIMEOUT_S} "
               rf"s for a peer rank on {re.escape(ADDRS[1])} \("),
)
LOSS_ARGS = ["--max-steps", "300", "--save-every", "3", f"--train.collective_timeout_s={LOSS_TIMEOUT_S}"]


def resume_args(max_steps: int | str) -> list[str]:
    return ["--resume", "latest", "--max-steps", str(max_steps)]


@pytest.mark.timeout(JOB_TIMEOUT_S * 3 + 60)
def test_node_lost_then_resume(hosts: TwoHosts, tmp_path: Path, synthetic_cache: Path) -> None:
    """Host 1 is lost mid-run (link down, then every process on it killed: no RST reaches host 0). Host 0
    ends within train.collective_timeout_s (plus torchrun's teardown) with one line naming host 1; after
    host 1 is back, `--resume latest` on both continues from the last checkpoint."""
    out = tmp_path / "out"
    args = [*launcher_args(out, synthetic_cache), *LOSS_ARGS]
    port, env = free_port(), host_env(hosts)
    procs = [subprocess.Popen(hosts.in_host(i, torchrun_static(i, port, args)), cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    try:
        deadline, seen = time.monotonic() + JOB_TIMEOUT_S, []
        assert procs[0].stdout is not None
        for line in procs[0].stdout:  # ends at EOF or once two checkpoints are written
            seen.append(line)
            if "step_00000006" in line or time.monotonic() > deadline:
                break
        assert any("step_00000006" in line for line in seen), "".join(seen)[-4000:]
        hosts.kill_host(1)
        lost_at, line_s, rest = time.monotonic(), None, []
        bound = threading.Timer(LOSS_TIMEOUT_S + 90, procs[0].kill)  # a hung host 0 fails instead of blocking
        bound.start()
        for line in procs[0].stdout:  # to EOF: host 0's rank and torchrun have ended
            rest.append(line)
            if line_s is None and "megaface train: error:" in line:
                line_s = time.monotonic() - lost_at
        bound.cancel()
        procs[0].wait(timeout=30)
        ended_s = time.monotonic() - lost_at
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
        hosts.revive_host(1)
    errors = [line.rstrip("\n") for line in rest if "megaface train: error:" in line]
    text = "".join(rest)
    assert len(errors) == 1 and any(pattern.search(errors[0]) for pattern in LOSS_LINES), text[-4000:]
    assert procs[0].returncode != 0 and re.search(r"exitcode\s*: 3\b", text), text[-4000:]  # the rank's: 3
    # the silence must last the timeout before anyone can tell; the slack is a beat, and a loaded machine
    assert line_s is not None and line_s < LOSS_TIMEOUT_S + 15, f"the line came {line_s} s after the loss"
    assert ended_s < LOSS_TIMEOUT_S + 45, f"host 0 ended {ended_s:.1f} s after host 1 was lost"
    print(f"host 0: the line {line_s:.1f} s and the end {ended_s:.1f} s after host 1 was lost, exit code "
          f"{procs[0].returncode}: {errors[0]}")

    step = int((out / "checkpoints" / "latest").read_text().strip().rsplit("_", 1)[-1])
    assert step >= 6
    resume = [*launcher_args(out, synthetic_cache), *resume_args(step + 3)]
    port = free_port()
    node0, node1 = run_on_both(hosts, [torchrun_static(0, port, resume), torchrun_static(1, port, resume)], env)
    assert node0.returncode == 0 and node1.returncode == 0, (node0.stdout + node0.stderr + node1.stderr)[-6000:]
    iters = [int(i) for i, _, _ in TRAIN_LINE.findall(node0.stdout)]
    assert iters == [step, step + 1, step + 2], node0.stdout[-4000:]


def test_docs_show_the_commands_run_here() -> None:
    """docs/multinode.md's "Tested across two hosts" shows the commands above, as built here (no hosts needed)."""
    doc = (ROOT / "docs" / "multinode.md").read_text()
    section = doc[doc.index("## Tested across two hosts"):doc.index("## Troubleshooting")]
    text = " ".join(section.replace("\\\n", " ").split())  # shell line continuations joined
    tiny = " ".join(launcher_args(Path("$OUT"), Path("$CACHE"))).replace(f"{ROOT}/", "")
    assert f'TINY="{tiny.replace(chr(34), chr(92) + chr(34))}"' in text, tiny
    tiny_cmd = ["$TINY"]
    expected = [
        torchrun_static("$i", "$PORT", tiny_cmd),
        torchrun_c10d("$IS_HOST", "$ADDR", "$PORT", tiny_cmd),
        deepspeed_cmd("$DIR/hostfile", "$PORT", tiny_cmd),
        mpirun_cmd("python", tiny_cmd),
        [*(f"{k}={v}" if " " not in v else f'{k}="{v}"' for k, v in seed_vars("$DIR/hostfile", "$PORT").items()),
         SEED_SCRIPT, *SEED_TINY, "$TINY_WITHOUT_CONFIG"],
        torchrun_static("$i", "$PORT", [*tiny_cmd, *LOSS_ARGS]),
        torchrun_static("$i", "$PORT", [*tiny_cmd, *resume_args("$((STEP + 3))")]),
    ]
    for cmd in expected:
        assert f"`{' '.join(cmd)}`" in text, " ".join(cmd)
    for name, content in ((".deepspeed_env", DS_ENV), ("hostfile", "".join(f"{a} slots=1\n" for a in ADDRS))):
        assert f"# {name}\n{content}" in section, (name, content)
    assert f"# .deepspeed_env of the seed script\n{SEED_DS_ENV}" in section


def test_hosts_are_removed_after_a_failure_and_after_a_killed_run(tmp_path: Path) -> None:
    """An exception inside `two_hosts` removes its namespaces, /etc/netns entries and sshds; a namespace left
    by a run whose owner is gone (SIGKILL) is removed by the next `two_hosts`, one of a live run is kept."""
    if (why := missing()) is not None:
        pytest.skip(f"two hosts from network namespaces cannot be made: {why}")

    def namespaces() -> set[str]:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        return {line.split()[0] for line in listed.splitlines() if line.strip()}

    stale = "mf4999999-dead" + "a"  # pid 4999999 > the kernel's largest pid: no such owner
    subprocess.run(["ip", "netns", "add", stale], check=True)
    Path(f"/etc/netns/{stale}").mkdir(parents=True, exist_ok=True)
    made: tuple[str, str] = ("", "")
    sshd: list[subprocess.Popen] = []
    with pytest.raises(RuntimeError, match="a failing case"):
        with two_hosts(tmp_path) as failing:
            made, sshd = failing.namespaces, list(failing.sshd)
            assert set(made) <= namespaces() and stale not in namespaces()  # removed on the way in
            raise RuntimeError("a failing case")
    assert not set(made) & namespaces(), namespaces()
    assert not any(Path(f"/etc/netns/{ns}").exists() for ns in (*made, stale))
    assert all(proc.poll() is not None for proc in sshd)
