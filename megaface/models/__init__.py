"""Face-recognition backbones: MobileFaceNet family, IResNet-18/34/50/100/200 and ViT-T/S/B/L/H.

>>> from megaface.models import build_model
>>> model = build_model("iresnet50")          # float [N, 3, 112, 112] -> [N, 512]

Modules: registry.py (build a network by name), mobilefacenet.py, iresnet.py, vit.py (the networks),
layers.py (shared blocks and init), profile.py (parameter and multiply-add counts), cli.py (`megaface models`).
"""
from .iresnet import IResNet
from .mobilefacenet import MobileFaceNet, MobileFaceNetSpec
from .profile import ModelProfile, count_madds, count_parameters, profile_model
from .registry import build_model, build_option_names, default_embedding_size, list_models
from .vit import VIT_SPECS, VisionTransformer, ViTSpec

__all__ = [
    "IResNet",
    "MobileFaceNet",
    "MobileFaceNetSpec",
    "ModelProfile",
    "VIT_SPECS",
    "ViTSpec",
    "VisionTransformer",
    "build_model",
    "build_option_names",
    "count_madds",
    "count_parameters",
    "default_embedding_size",
    "list_models",
    "profile_model",
]
