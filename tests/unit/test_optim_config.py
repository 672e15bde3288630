"""Optimizer / schedule / ViT config keys, the optimizer single-source check, and the arcface_torch recipes."""
from __future__ import annotations

from pathlib import Path

import pytest

from megaface.config import check_optimizer_single_source, load_config, load_ds_config, resolve_ds_config

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "launch" / "configs"
BASE = ["--train.max_steps=10"]


def test_defaults_keep_sgd_and_the_step_schedule():
    o = load_config(None, BASE).optim
    assert (o.name, o.schedule, o.betas, o.eps, o.power) == ("sgd", "step", (0.9, 0.999), 1e-8, 1.0)


def test_adamw_polynomial_and_vit_options_load():
    cfg = load_config(None, BASE + ["--optim.name=adamw", "--optim.schedule=polynomial", "--optim.betas=[0.9, 0.95]",
                                    "--optim.power=2", "--optim.warmup_epochs=1.5", "--model.network=vit_t",
                                    "--model.mask_ratio=0.1", "--model.checkpointing=true"])
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.power == 2.0 and cfg.optim.warmup_epochs == 1.5
    assert cfg.model.build_options() == {"mask_ratio": 0.1, "checkpointing": True}


@pytest.mark.parametrize("override, match", [
    ("--optim.name=lamb", "optim.name"),
    ("--optim.schedule=cosine", "optim.schedule"),
    ("--optim.betas=[0.9, 1.0]", "betas"),
    ("--optim.eps=0", "eps"),
    ("--optim.warmup_epochs=-1", "warmup"),
])
def test_bad_optim_values(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, BASE + [override])


def test_polynomial_refuses_milestones_and_double_warmup():
    with pytest.raises(ValueError, match="milestones"):
        load_config(None, BASE + ["--optim.schedule=polynomial", "--optim.milestones=[5]"])
    with pytest.raises(ValueError, match="not both"):
        load_config(None, BASE + ["--optim.warmup_steps=3", "--optim.warmup_epochs=1"])


def _adamw_cfg():
    return load_config(None, BASE + ["--optim.name=adamw", "--optim.lr=0.001", "--optim.weight_decay=0.1"])


def test_agreeing_optimizer_section_is_dropped():
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0,
          "optimizer": {"type": "AdamW", "params": {"lr": 0.001, "betas": [0.9, 0.999], "weight_decay": 0.1}}}
    out = check_optimizer_single_source(_adamw_cfg(), ds)
    assert "optimizer" not in out and "optimizer" in ds  # the caller's dict is not modified
    resolve_ds_config(out, 1, "cpu")
    # DeepSpeed's "Adam" is AdamW unless adam_w_mode is false
    check_optimizer_single_source(_adamw_cfg(), {"optimizer": {"type": "Adam"}})
    assert check_optimizer_single_source(_adamw_cfg(), {"bf16": {"enabled": True}}) == {"bf16": {"enabled": True}}


@pytest.mark.parametrize("section, match", [
    ({"type": "AdamW", "params": {"lr": 0.01}}, r"params.lr=0.01 but optim.lr=0.001"),
    ({"type": "AdamW", "params": {"betas": [0.9, 0.95]}}, "params.betas"),
    ({"type": "AdamW", "params": {"weight_decay": 0.05, "eps": 1e-6}}, r"weight_decay.*eps|eps.*weight_decay"),
    ({"type": "SGD", "params": {"lr": 0.001}}, "is not optim.name='adamw'"),
    ({"type": "Adam", "params": {"adam_w_mode": False}}, "adam_w_mode=False"),
])
def test_disagreeing_optimizer_section_is_refused(section, match):
    with pytest.raises(ValueError, match=match):
        check_optimizer_single_source(_adamw_cfg(), {"optimizer": section})


def test_sgd_momentum_is_compared():
    cfg = load_config(None, BASE)
    with pytest.raises(ValueError, match="momentum"):
        check_optimizer_single_source(cfg, {"optimizer": {"type": "SGD", "params": {"momentum": 0.8}}})


# name -> (network, optim.name, lr, weight decay, sample rate, epochs, warmup epochs, global batch at 8 GPUs)
ARCFACE_TORCH = {
    "wf42m_r100_pfc02": ("iresnet100", "sgd", 0.1, 5e-4, 0.2, 20, 0, 8 * 128),
    "wf42m_vit_t_pfc03": ("vit_t", "adamw", 1e-3, 0.1, 0.3, 40, 4, 8 * 512),
    "wf42m_vit_b_pfc03": ("vit_b", "adamw", 1e-3, 0.1, 0.3, 40, 4, 8 * 256 * 12),
    "wf42m_vit_l_pfc03": ("vit_l", "adamw", 1e-3, 0.1, 0.3, 40, 4, 8 * 384),  # arcface_torch: x 64 GPUs
    "wf12m_conflict_r50_pfc03_filter": ("iresnet50", "sgd", 0.1, 5e-4, 0.3, 20, 2, 8 * 128),
}


@pytest.mark.parametrize("name", sorted(ARCFACE_TORCH))
def test_recipes_match_arcface_torch(name):
    cfg = load_config(RECIPES / f"{name}.yaml")
    network, opt, lr, wd, rate, epochs, warmup, batch = ARCFACE_TORCH[name]
    assert (cfg.model.network, cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == (network, opt, lr, wd)
    assert (cfg.head.sample_rate, cfg.train.epochs, cfg.optim.warmup_epochs) == (rate, epochs, warmup)
    assert cfg.optim.schedule == "polynomial" and cfg.optim.power == 1.0 and cfg.head.margin == (1.0, 0.0, 0.4)
    ds = resolve_ds_config(check_optimizer_single_source(cfg, load_ds_config(cfg.train.ds_config)), 8, "cuda")
    assert ds["train_batch_size"] == batch and ds["gradient_clipping"] == 5.0 and ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 1
    assert (ROOT / "launch" / f"train_{name}.sh").is_file()
    assert f"train_{name}.sh" in (ROOT / "launch" / "README.md").read_text()
