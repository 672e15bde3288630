"""The knobs of the early-learning ablation (docs/learning.md): margin fallback, FC7 init std, FC7 clipping,
the backbone's ungrouped init, and the benchmark's log parser. Pure: no process group, no DeepSpeed engine."""

from __future__ import annotations

import math

import pytest
import torch

from megaface.config import load_config
from megaface.train.build import fc7_max_norm
from megaface.head import PartialFC
from megaface.head.margin import CombinedMargin
from megaface.models import build_model
from megaface.models.layers import init_conv_weights


@pytest.mark.parametrize("straight_through", [False, True])
def test_fallback_none_is_the_plain_cosine_everywhere(straight_through: bool) -> None:
    theta = torch.linspace(0.05, math.pi - 0.05, 200, dtype=torch.float64)
    plain = CombinedMargin((1.0, 0.5, 0.0), straight_through, fallback="none")(torch.cos(theta))
    torch.testing.assert_close(plain, torch.cos(theta + 0.5), rtol=0, atol=1e-12)
    shifted = CombinedMargin((1.0, 0.5, 0.0), straight_through)(torch.cos(theta))
    inside = theta <= math.pi - 0.5
    torch.testing.assert_close(shifted[inside], plain[inside])
    assert (shifted[~inside] < plain[~inside]).all()  # the default keeps penalising past the limit


def test_unknown_fallback_is_rejected() -> None:
    with pytest.raises(ValueError, match="fallback='classic'"):
        CombinedMargin("arcface", fallback="classic")


def test_fc7_init_std_scales_the_same_draw() -> None:
    small = PartialFC(16, 10, init_std=0.001, seed=3).weight.detach()
    usual = PartialFC(16, 10, seed=3).weight.detach()
    torch.testing.assert_close(small * 10, usual)
    with pytest.raises(ValueError, match="init_std=0"):
        PartialFC(16, 10, init_std=0.0)


def test_fc7_clip_defaults_to_the_json_and_zero_disables() -> None:
    ds = {"gradient_clipping": 5.0}
    assert fc7_max_norm(None, ds) == 5.0
    assert fc7_max_norm(0.0, ds) == 0.0
    assert fc7_max_norm(2.5, {}) == 2.5
    assert fc7_max_norm(None, {}) == 0.0


def test_config_keys_and_their_checks() -> None:
    cfg = load_config(None, ["--train.max_steps=1", "--head.margin_fallback=none", "--head.init_std=0.1",
                             "--head.clip_grad_norm=0", "--model.init=arcface_torch"])
    assert (cfg.head.margin_fallback, cfg.head.init_std, cfg.head.clip_grad_norm, cfg.model.init) == \
        ("none", 0.1, 0.0, "arcface_torch")
    for bad, match in ((["--head.margin_fallback=classic"], "margin_fallback"),
                       (["--model.init=xavier"], "model.init"), (["--head.init_std=-1"], "init_std"),
                       (["--head.clip_grad_norm=-1"], "clip_grad_norm"),
                       (["--head.clip_grad_norm=5", "--head.parallel=data"], "parallel=model")):
        with pytest.raises(ValueError, match=match):
            load_config(None, ["--train.max_steps=1", *bad])


def test_ungrouped_init_shrinks_only_grouped_kernels() -> None:
    torch.manual_seed(0)
    model = build_model("mobilefacenet_tiny")
    before = {n: p.detach().norm().item() for n, p in model.named_parameters() if p.dim() == 4}
    init_conv_weights(model, per_group=False)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            ratio = before[name + ".weight"] / module.weight.detach().norm().item()
            if module.groups > 1:  # std sqrt(2 / (out * k * k)) instead of sqrt(2 / (out / groups * k * k))
                assert ratio == pytest.approx(math.sqrt(module.groups), rel=0.3)
            else:
                assert ratio == pytest.approx(1.0, rel=0.3)


def test_benchmark_log_parser() -> None:
    from benchmarks.learning import parse_log

    log = ("validation at iteration 50 (10 s into training):\nValidation on [val]:\nAccuracy-Flip: 0.71000+-0.01\n"
           "Validation on [other]:\nAccuracy-Flip: 0.5+-0.1\nvalidation at iteration 100 (20 s):\n"
           "Accuracy-Flip: 0.86500+-0.02\n")
    assert parse_log(log) == {50: 0.71, 100: 0.865}


def _straight_through_job(state):
    from tests.support.partial_fc_reference import MARGINS, S, D, _local_step

    return [_local_step(state, PartialFC(D, 10, margin=CombinedMargin(m, straight_through=True), scale=S)) for m in MARGINS]


def test_straight_through_exact_at_world_size_3():
    """The other gradient mode against the same single-process reference (uneven split 4/3/3)."""
    from tests.conftest import run_distributed
    from tests.support.partial_fc_reference import MARGINS, RTOL, _reference, _rel

    results = run_distributed(_straight_through_job, 3)
    for i, margin in enumerate(MARGINS):
        ref = _reference(10, margin, straight_through=True)
        for r in (per_rank[i] for per_rank in results):
            assert _rel(r["loss"], ref["loss"]) < RTOL and _rel(r["bb"], ref["bb"]) < RTOL, margin
        emb_grad = torch.cat([per_rank[i]["emb"] for per_rank in results]) / 3
        assert _rel(emb_grad, ref["emb"]) < RTOL, margin
        assert _rel(torch.cat([per_rank[i]["w"] for per_rank in results]), ref["w"]) < RTOL, margin
