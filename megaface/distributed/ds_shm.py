"""Keep DeepSpeed from compiling its CPU shared-memory comm op, so nothing in megaface needs a C++ compiler.

When DeepSpeed's comm backend starts on CPU (`deepspeed.initialize`, `deepspeed.init_distributed`) it
JIT-builds a shared-memory all-reduce extension with `c++` (about 23 s on a fresh machine, minutes on a loaded
one, and a hard `c++: not found` failure where no compiler is installed). Only DeepSpeed's inference
all-reduce uses that op; training collectives go through the torch process group megaface creates. Call
`skip_shm_build()` before DeepSpeed's comm backend starts. MEGAFACE_DS_SHM=1 keeps DeepSpeed's behaviour.
"""

from __future__ import annotations

import importlib
import os

ENV_KEEP = "MEGAFACE_DS_SHM"


def skip_shm_build() -> bool:
    """Replace DeepSpeed's shared-memory op builder by a no-op; returns False when MEGAFACE_DS_SHM=1 kept it."""
    if os.environ.get(ENV_KEEP) == "1":
        return False
    # importlib, not `import deepspeed.comm.torch as m`: deepspeed.comm re-exports the name `torch`
    # (the torch package), which shadows the submodule in attribute lookup, so that import would patch
    # the torch package and leave DeepSpeed's builder in place
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    setattr(ds_torch_comm, "build_shm_op", lambda: None)  # noqa: B010  (a module attribute mypy cannot see)
    return True
