"""Process-group setup for every launcher megaface supports.

`init_distributed()` reads the launcher's environment once and returns a frozen `DistState`; nothing
happens at import time and nothing is kept in module globals. Supported launchers:

| launcher                                   | variables read                                         |
|--------------------------------------------|--------------------------------------------------------|
| `deepspeed` (with or without a hostfile)   | RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT |
| `torchrun`                                 | same                                                   |
| `mpirun` (OpenMPI)                         | OMPI_COMM_WORLD_RANK/_SIZE/_LOCAL_RANK/_LOCAL_SIZE     |
| `mpirun` (MPICH, Intel MPI), `srun`        | PMI_RANK/PMI_SIZE, SLURM_PROCID/SLURM_NTASKS           |
| plain `python`                             | nothing: one process, no process group                 |

When a launcher started us, the rank also dies with its launcher (`exit_with_parent`): a `kill -9` of
torchrun / deepspeed / mpirun would otherwise leave the ranks training (and writing checkpoints) as orphans.

Under MPI the rendezvous address is MASTER_ADDR/MASTER_PORT when set; otherwise rank 0 picks one and
broadcasts it with mpi4py (loopback when all ranks share one host).
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megaface.distributed import comm
from megaface.distributed.netif import SOCKET_IFNAME_VARS, local_address, socket_ifname_env


@dataclass(frozen=True)
class DistState:
    """Where this process sits in the job. `group=None` means the default (world) group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    group: dist.ProcessGroup | None = None
    #: per rank, the host it runs on as "address (host name)"; empty for one process. Names a lost host.
    hosts: tuple[str, ...] = ()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str


def _int_env(environ: dict[str, str], *names: str) -> int | None:
    for name in names:
        value = environ.get(name)
        if value is not None and value != "":
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    return None


def detect_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Rank / world size / local rank as the launcher set them (pure: reads `environ` only)."""
    env = dict(os.environ if environ is None else environ)
    candidates = [
        ("torch", ("RANK",), ("WORLD_SIZE",), ("LOCAL_RANK",), ("LOCAL_WORLD_SIZE",)),
        ("openmpi", ("OMPI_COMM_WORLD_RANK",), ("OMPI_COMM_WORLD_SIZE",),
         ("OMPI_COMM_WORLD_LOCAL_RANK",), ("OMPI_COMM_WORLD_LOCAL_SIZE",)),
        ("pmi", ("PMI_RANK",), ("PMI_SIZE",), ("MPI_LOCALRANKID",), ("MPI_LOCALNRANKS",)),
        ("slurm", ("SLURM_PROCID",), ("SLURM_NTASKS",), ("SLURM_LOCALID",), ("SLURM_NTASKS_PER_NODE",)),
    ]
    for launcher, rank_k, size_k, lrank_k, lsize_k in candidates:
        rank = _int_env(env, *rank_k)
        size = _int_env(env, *size_k)
        if rank is None or size is None:
            continue
        if not 0 <= rank < size:
            raise ValueError(f"launcher '{launcher}' set rank {rank} outside world size {size}")
        local_rank = _int_env(env, *lrank_k)
        local_size = _int_env(env, *lsize_k)
        return LaunchEnv(rank, size, rank if local_rank is None else local_rank,
                         size if local_size is None else local_size, launcher)
    return LaunchEnv(0, 1, 0, 1, "single")


def _default_device(local_rank: int) -> torch.device:
    accel = getattr(torch, "accelerator", None)
    if accel is not None and accel.is_available():
        kind = accel.current_accelerator().type
        return torch.device(kind, local_rank % max(accel.device_count(), 1))
    return torch.device("cpu")


def _default_backend(device: torch.device) -> str:
    getter = getattr(dist, "get_default_backend_for_device", None)
    if getter is not None:
        return getter(device)
    return "nccl" if device.type == "cuda" else "gloo"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _mpi_rendezvous(launch: LaunchEnv) -> None:
    """Fill MASTER_ADDR/MASTER_PORT for MPI launches, where no launcher set them."""
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        return
    try:
        from mpi4py import MPI
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"launched by MPI ({launch.launcher}) without MASTER_ADDR/MASTER_PORT; or export MASTER_ADDR and "
            "MASTER_PORT", name="mpi4py") from None
    comm = MPI.COMM_WORLD
    payload: tuple[str, str] | None = None
    if launch.rank == 0:
        single_host = launch.local_world_size == launch.world_size
        addr = os.environ.get("MASTER_ADDR") or (
            "127.0.0.1" if single_host else socket.gethostbyname(socket.gethostname()))
        if not single_host and addr.startswith("127."):
            # Debian-style /etc/hosts maps the host name to 127.0.1.1: other nodes could never reach it.
            payload = ("error", f"MPI job over several nodes: rank 0's host name resolves to the loopback "
                                f"address {addr}; export MASTER_ADDR=<an address of rank 0's node that every "
                                "node can reach> (see docs/multinode.md)")
        else:
            payload = (addr, str(os.environ.get("MASTER_PORT") or _free_port()))
    addr, port = comm.bcast(payload, root=0)  # every rank learns the outcome, so none waits forever
    if addr == "error":
        raise RuntimeError(port)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _set_parent_death_signal(sig: int) -> bool:
    """Linux: ask the kernel to send `sig` to this process when its parent dies. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, interval_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(interval_s)
    print(f"[pid {os.getpid()}] launcher (pid {parent}) is gone: exiting", file=sys.stderr, flush=True)
    os._exit(1)  # no cleanup: the collectives' peers are gone or about to be


def exit_with_parent(interval_s: float = 1.0) -> None:
    """End this process when its launcher (the parent process) dies, however it dies.

    Linux: prctl(PR_SET_PDEATHSIG, SIGKILL), delivered by the kernel even while a collective blocks in C.
    Elsewhere: a daemon thread polling the parent pid every `interval_s`. A launcher that died while the
    signal was being armed ends this process at once.
    """
    parent = os.getppid()
    if not _set_parent_death_signal(signal.SIGKILL):
        threading.Thread(target=_watch_parent, args=(parent, interval_s), name="megaface-parent-watch",
                         daemon=True).start()
    if os.getppid() != parent:  # the parent died between reading its pid and arming the signal
        os.kill(os.getpid(), signal.SIGKILL)


def _advertise_routable_interface(backend: str, launch: LaunchEnv) -> None:
    """Export the backend's *_SOCKET_IFNAME (when unset) so that this rank advertises the address other hosts
    reach it by, not its host name's (often loopback); logged once per node (local rank 0)."""
    chosen = socket_ifname_env(backend, os.environ, multi_host=launch.local_world_size < launch.world_size)
    if chosen is None:
        return
    var, iface = chosen
    os.environ[var] = iface
    if launch.local_rank == 0:
        print(f"[rank {launch.rank}] network: {var}={iface} (the interface routing to MASTER_ADDR="
              f"{os.environ['MASTER_ADDR']} on {socket.gethostname()}; export {var} to choose another)",
              file=sys.stderr, flush=True)


def init_distributed(backend: str | None = None, timeout_s: float = 600.0,
                     require_group: bool = False) -> DistState:
    """Join the job the launcher started (or stay a single process) and return its `DistState`.

    A launched rank exits when its launcher dies (`exit_with_parent`; MEGAFACE_EXIT_WITH_PARENT=0 turns
    this off, e.g. under a launcher that daemonises its workers). Exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* so that DeepSpeed, started afterwards, finds the same
    process group instead of running its own discovery. `require_group=True` gives a single process a
    1-rank group on a free loopback port (DeepSpeed would otherwise run its own, MPI-based discovery).
    Unless the user set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, the interface routing to a non-loopback
    MASTER_ADDR is exported as that variable (`netif.socket_ifname_env`).
    """
    launch = detect_launch_env()
    device = _default_device(launch.local_rank)
    if device.type != "cpu":
        getattr(torch, device.type).set_device(device)
    if launch.world_size == 1 and not dist.is_initialized():
        if not require_group:
            return DistState(0, 1, 0, 1, device, None)
        if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):  # torchrun sets both
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if launch.launcher != "single" and os.environ.get("MEGAFACE_EXIT_WITH_PARENT", "1") != "0":
        exit_with_parent()
    if launch.launcher in ("openmpi", "pmi", "slurm"):
        _mpi_rendezvous(launch)
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size),
                      LOCAL_RANK=str(launch.local_rank), LOCAL_WORLD_SIZE=str(launch.local_world_size))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = backend or _default_backend(device)
    if not dist.is_initialized():
        _advertise_routable_interface(backend, launch)
        dist.init_process_group(
            backend=backend,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    iface = os.environ.get(SOCKET_IFNAME_VARS.get(backend, ""), "")
    here = f"{local_address(os.environ['MASTER_ADDR'], iface.split(',')[0] or None)} ({socket.gethostname()})"
    hosts = tuple(comm.all_gather_object(here)) if launch.world_size > 1 else ()
    return DistState(launch.rank, launch.world_size, launch.local_rank, launch.local_world_size, device, None,
                     hosts)


def shutdown() -> None:
    """Destroy the default process group (avoids rare aborts at interpreter exit under gloo)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
