"""Distributed state and the collectives megaface uses; no other module calls torch.distributed collectives.

    state.py   process-group setup for every launcher (`init_distributed`, `DistState`)
    netif.py   which interface gloo/NCCL advertise to other hosts when no *_SOCKET_IFNAME is set
    comm.py    every collective, as raw op / autograd Function / public wrapper
    ds_shm.py  keeps DeepSpeed from compiling its shared-memory op (no C++ compiler needed)
    heartbeat.py  a store heartbeat: the first rank error reaches every rank; a silent rank is named and ended
"""

from megaface.distributed.state import DistState, init_distributed, shutdown

__all__ = ["DistState", "init_distributed", "shutdown"]
