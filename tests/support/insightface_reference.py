"""arcface_torch's networks written out independently (layouts, random weights, forward), shared by the interop tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IRESNET = {"iresnet18": (2, 2, 2, 2), "iresnet34": (3, 4, 6, 3), "iresnet50": (3, 4, 14, 3),
           "iresnet100": (3, 13, 30, 3), "iresnet200": (6, 26, 60, 6)}


# megaface name -> arcface_torch MobileFaceNet(scale, blocks, num_features)
MBF = {"mobilefacenet": (1, (1, 4, 6, 2), 128), "mobilefacenet_wide": (2, (1, 4, 6, 2), 512),
       "mobilefacenet_large": (4, (2, 8, 12, 4), 512)}


EPS = 1e-5  # arcface_torch's BatchNorm eps


def _bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def iresnet_layout(units, dim):
    shapes = {"conv1.weight": (64, 3, 3, 3), **_bn("bn1", 64), "prelu.weight": (64,)}
    in_c = 64
    for stage, (count, c) in enumerate(zip(units, (64, 128, 256, 512), strict=False), start=1):
        for i in range(count):
            p = f"layer{stage}.{i}"
            shapes.update(_bn(f"{p}.bn1", in_c))
            shapes[f"{p}.conv1.weight"] = (c, in_c, 3, 3)
            shapes.update(_bn(f"{p}.bn2", c))
            shapes[f"{p}.prelu.weight"] = (c,)
            shapes[f"{p}.conv2.weight"] = (c, c, 3, 3)
            shapes.update(_bn(f"{p}.bn3", c))
            if i == 0:
                shapes[f"{p}.downsample.0.weight"] = (c, in_c, 1, 1)
                shapes.update(_bn(f"{p}.downsample.1", c))
            in_c = c
    shapes.update(_bn("bn2", 512))
    shapes.update({"fc.weight": (dim, 512 * 7 * 7), "fc.bias": (dim,)})
    shapes.update(_bn("features", dim))
    return shapes


def _conv_block(prefix, cin, cout, k, groups=1, act=True):
    shapes = {f"{prefix}.layers.0.weight": (cout, cin // groups, k, k), **_bn(f"{prefix}.layers.1", cout)}
    if act:
        shapes[f"{prefix}.layers.2.weight"] = (cout,)
    return shapes


def _depthwise(prefix, cin, cout, groups):
    return {**_conv_block(f"{prefix}.layers.0", cin, groups, 1),
            **_conv_block(f"{prefix}.layers.1", groups, groups, 3, groups=groups),
            **_conv_block(f"{prefix}.layers.2", groups, cout, 1, act=False)}


def _residual(prefix, c, count, groups):
    shapes = {}
    for j in range(count):
        shapes.update(_depthwise(f"{prefix}.layers.{j}", c, c, groups))
    return shapes


def mbf_layout(scale, blocks, dim):
    c1, c2 = 64 * scale, 128 * scale
    shapes = _conv_block("layers.0", 3, c1, 3)
    if blocks[0] == 1:
        shapes.update(_conv_block("layers.1", c1, c1, 3, groups=64))
    else:
        shapes.update(_residual("layers.1", c1, blocks[0], 128))
    shapes.update({**_depthwise("layers.2", c1, c1, 128), **_residual("layers.3", c1, blocks[1], 128),
                   **_depthwise("layers.4", c1, c2, 256), **_residual("layers.5", c2, blocks[2], 256),
                   **_depthwise("layers.6", c2, c2, 512), **_residual("layers.7", c2, blocks[3], 256),
                   **_conv_block("conv_sep", c2, 512, 1),
                   **_conv_block("features.layers.0", 512, 512, 7, groups=512, act=False),
                   "features.layers.2.weight": (dim, 512), **_bn("features.layers.3", dim)})
    return shapes


def layout(name, dim=None):
    if name in IRESNET:
        return iresnet_layout(IRESNET[name], dim or 512)
    scale, blocks, default = MBF[name]
    return mbf_layout(scale, blocks, dim or default)


def random_state(shapes, seed=0, device="cpu"):
    """Plausible trained weights: He-scaled convs, BatchNorm near identity, positive variances."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if device == "meta":
            state[key] = torch.empty(shape, device="meta", dtype=torch.int64 if shape == () else torch.float32)
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000 + seed, dtype=torch.int64)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(("running_mean", ".bias")):
            state[key] = torch.randn(shape, generator=g) * 0.1
        elif len(shape) == 1:  # BatchNorm gamma or PReLU slope
            state[key] = 1.0 + torch.randn(shape, generator=g) * 0.1 if "prelu" not in key and not key.endswith(
                "layers.2.weight") else torch.full(shape, 0.25)
        else:
            fan_in = torch.tensor(shape[1:]).prod().item()
            state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


def _bn_f(sd, p, x):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        False, 0.0, EPS)


def _block_f(sd, p, x, stride=1, pad=0, act=True):
    w = sd[f"{p}.layers.0.weight"]
    groups = x.shape[1] // w.shape[1]
    x = _bn_f(sd, f"{p}.layers.1", F.conv2d(x, w, stride=stride, padding=pad, groups=groups))
    return F.prelu(x, sd[f"{p}.layers.2.weight"]) if act else x


def _depthwise_f(sd, p, x, stride, residual):
    y = _block_f(sd, f"{p}.layers.0", x)
    y = _block_f(sd, f"{p}.layers.1", y, stride, 1)
    y = _block_f(sd, f"{p}.layers.2", y, act=False)
    return x + y if residual else y


def mbf_forward(sd, blocks, x):
    x = _block_f(sd, "layers.0", x, 2, 1)
    for index in range(1, 8):
        p = f"layers.{index}"
        if index == 1 and blocks[0] == 1:
            x = _block_f(sd, p, x, 1, 1)
        elif index % 2 == 0:
            x = _depthwise_f(sd, p, x, 2, False)
        else:
            for j in range(blocks[(index - 1) // 2]):
                x = _depthwise_f(sd, f"{p}.layers.{j}", x, 1, True)
    x = _block_f(sd, "features.layers.0", _block_f(sd, "conv_sep", x), act=False)
    x = F.linear(torch.flatten(x, 1), sd["features.layers.2.weight"])
    return _bn_f(sd, "features.layers.3", x)
