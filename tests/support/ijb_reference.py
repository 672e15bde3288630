"""Run arcface_torch's own eval_ijbc.py, unmodified, on a CPU with a megaface backbone standing in for its network.

    python tests/support/ijb_reference.py ARCFACE_TORCH_DIR IJB_DIR TARGET CHECKPOINT NETWORK RESULT_DIR BATCH_SIZE

The script runs end to end: its own reading of the meta files, cv2.imread, its scikit-image alignment, flip,
pixel normalisation, detector-score weighting, media/template pooling, pair scores, and its TAR@FAR table
(printed by prettytable). What is patched, and only that:

- `backbones.get_model` (arcface_torch's model zoo) returns megaface's `build_model(NETWORK, 512)`; the script
  then loads CHECKPOINT (a plain state_dict of that network) with its own `torch.load` + `load_state_dict`,
  so both sides embed with the same weights;
- `.cuda()` of modules and tensors returns them unchanged (the script hard-codes CUDA; tests run on a CPU);
- `menpo.visualize.viewmatplotlib.sample_colours_from_colourmap` (only picks plot colours; menpo is not
  installable on current Pythons) returns matplotlib's Set2 colours;
- `numpy.int`, removed in NumPy 1.24, is the builtin `int` the script meant.

Needs pandas, scikit-image, prettytable, matplotlib, scikit-learn, opencv and torch in the interpreter.
"""

from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

import numpy as np
import torch


def _stub_modules(network: str) -> None:
    from megaface.models import build_model

    backbones = types.ModuleType("backbones")
    backbones.get_model = lambda name, **_: build_model(network, embedding_size=512)  # type: ignore[attr-defined]
    sys.modules["backbones"] = backbones

    def colours(n: int, name: str) -> list:
        from matplotlib import colormaps

        return [colormaps[name](i) for i in range(n)]

    for name in ("menpo", "menpo.visualize", "menpo.visualize.viewmatplotlib"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["menpo.visualize.viewmatplotlib"].sample_colours_from_colourmap = colours  # type: ignore[attr-defined]


def main(argv: list[str]) -> int:
    arcface_torch, ijb_dir, target, checkpoint, network, result_dir, batch_size = argv
    _stub_modules(network)
    torch.nn.Module.cuda = lambda self, device=None: self  # type: ignore[method-assign,assignment]
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign,assignment]
    np.int = int  # type: ignore[attr-defined]
    torch.set_num_threads(1)
    script = Path(arcface_torch) / "eval_ijbc.py"
    sys.argv = [str(script), "--model-prefix", checkpoint, "--image-path", ijb_dir, "--result-dir", result_dir,
                "--batch-size", batch_size, "--network", network, "--job", "reference", "--target", target]
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
