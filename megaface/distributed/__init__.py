"""Distributed state and the collectives megaface uses; no other module calls torch.distributed collectives."""

from megaface.distributed.state import DistState, init_distributed, shutdown

__all__ = ["DistState", "init_distributed", "shutdown"]
