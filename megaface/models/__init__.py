"""Face-recognition backbones: MobileFaceNet family and IResNet-18/34/50/100/200.

>>> from megaface.models import build_model
>>> model = build_model("iresnet50")          # float [N, 3, 112, 112] -> [N, 512]
"""
from .iresnet import IResNet
from .mobilefacenet import MobileFaceNet, MobileFaceNetSpec
from .profile import ModelProfile, count_madds, count_parameters, profile_model
from .registry import build_model, default_embedding_size, list_models

__all__ = [
    "IResNet",
    "MobileFaceNet",
    "MobileFaceNetSpec",
    "ModelProfile",
    "build_model",
    "count_madds",
    "count_parameters",
    "default_embedding_size",
    "list_models",
    "profile_model",
]
