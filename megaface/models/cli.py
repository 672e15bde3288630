"""`megaface models`: the networks `model.network` accepts, and what one costs.

    megaface models                      every name with its default embedding width
    megaface models iresnet100 mbf       parameters and multiply-adds per 112x112 image, measured on the network
"""

from __future__ import annotations

import argparse

import torch

from megaface.models.profile import profile_model
from megaface.models.registry import build_model, default_embedding_size, list_models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megaface models", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NETWORK", help="networks to profile (builds each one)")
    args = parser.parse_args(argv)
    if not args.names:
        width = max(len(n) for n in list_models())
        for name in list_models():
            print(f"{name.ljust(width)}  {default_embedding_size(name)}-d")
        return 0
    for name in args.names:
        with torch.no_grad():  # a real forward: the multiply-adds are counted by hooks on each layer
            profile = profile_model(build_model(name).eval())
        print(f"{name}: {default_embedding_size(name)}-d, {profile.params / 1e6:.2f} M parameters, "
              f"{profile.madds / 1e9:.3f} G multiply-adds per 112x112 image")
    return 0
