"""ds_configs/*.json: each file loads, passes megaface's cross-check and DeepSpeed's own validation, says what
its name says, documents every key it uses, and (on 2 gloo ranks) trains a toy model to the same weights as
a single-process SGD on the averaged gradient."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from megaface.config import load_config
from megaface.config import load_ds_config, precision, resolve_ds_config, zero_stage
from megaface.distributed.ds_shm import skip_shm_build
from tests.conftest import run_distributed

DS_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
FILES = sorted(DS_DIR.glob("*.json"))
NAME = re.compile(r"^zero(?P<stage>[0-3])_(?P<offload>offload_)?(?P<precision>fp32|bf16|fp16)\.json$")
COMM_KEYS = {  # communication settings each stage must set deliberately (README explains each)
    0: set(),
    1: {"overlap_comm", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size", "allgather_partitions",
        "allgather_bucket_size"},
    2: {"overlap_comm", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size", "allgather_partitions",
        "allgather_bucket_size"},
    3: {"overlap_comm", "contiguous_gradients", "reduce_bucket_size", "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance",
        "stage3_gather_16bit_weights_on_model_save"},
}


def ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def flat_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= flat_keys(value, f"{prefix}{key}.")
    return keys


def test_expected_variants_exist() -> None:
    names = {p.name for p in FILES}
    wanted = {f"zero{s}_{p}.json" for s in (0, 1, 2) for p in ("fp32", "bf16", "fp16")}
    wanted |= {"zero3_fp32.json", "zero3_bf16.json"}
    assert wanted <= names, sorted(wanted - names)
    assert any("offload" in n for n in names)
    assert all(NAME.match(n) for n in names), [n for n in names if not NAME.match(n)]


@pytest.mark.parametrize("path", FILES, ids=ids(FILES))
def test_file_says_what_its_name_says(path: Path) -> None:
    raw = json.loads(path.read_text())
    ds = load_ds_config(path)
    assert ds == raw
    name = NAME.match(path.name)
    assert zero_stage(ds) == int(name["stage"])
    assert precision(ds) == name["precision"]
    offload = ds["zero_optimization"].get("offload_optimizer")
    assert bool(name["offload"]) == bool(offload)
    if offload:
        assert offload["device"] == "cpu" and ds["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.parametrize("path", FILES, ids=ids(FILES))
def test_megaface_settings_explicit(path: Path) -> None:
    ds = load_ds_config(path)
    # DeepSpeed 0.19.8 clips at 1.0 when the key is absent: every file must say
    assert isinstance(ds["gradient_clipping"], float) and ds["gradient_clipping"] >= 0.0
    assert ds["train_micro_batch_size_per_gpu"] == 64  # the seed's per-GPU batch
    assert ds["gradient_accumulation_steps"] == 1
    assert "train_batch_size" not in ds  # derived, so a file works at any world size
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["steps_per_print"] >= 1_000_000 and ds["wall_clock_breakdown"] is False
    assert "optimizer" not in ds and "scheduler" not in ds  # megaface builds both from the YAML
    if precision(ds) == "fp16":
        assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
        assert {"initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale"} <= set(ds["fp16"])
    stage = zero_stage(ds)
    assert COMM_KEYS[stage] <= set(ds["zero_optimization"]), sorted(COMM_KEYS[stage] - set(ds["zero_optimization"]))


def test_variants_differ_only_in_their_names() -> None:
    """Same stage -> same ZeRO section (offload aside); same precision -> same precision section."""
    by_stage: dict[str, dict] = {}
    by_precision: dict[str, tuple] = {}
    for path in FILES:
        ds = load_ds_config(path)
        name = NAME.match(path.name)
        zero = {k: v for k, v in ds["zero_optimization"].items() if k != "offload_optimizer"}
        assert by_stage.setdefault(name["stage"], zero) == zero, path.name
        prec = (ds.get("fp16"), ds.get("bf16"))
        assert by_precision.setdefault(name["precision"], prec) == prec, path.name
        rest = {k: v for k, v in ds.items() if k not in ("zero_optimization", "fp16", "bf16",
                                                          "zero_force_ds_cpu_optimizer")}
        assert by_stage.setdefault("rest", rest) == rest, path.name


@pytest.mark.parametrize("world_size", [1, 2, 8])
@pytest.mark.parametrize("path", FILES, ids=ids(FILES))
def test_megaface_cross_check(path: Path, world_size: int) -> None:
    ds = load_ds_config(path)
    resolved = resolve_ds_config(ds, world_size=world_size, device_type="cuda")
    assert resolved["train_batch_size"] == 64 * world_size
    assert resolved["gradient_clipping"] == ds["gradient_clipping"]
    if precision(ds) == "fp16":
        with pytest.raises(ValueError, match="fp16"):
            resolve_ds_config(ds, world_size=world_size, device_type="cpu")
    else:
        assert resolve_ds_config(ds, world_size=world_size, device_type="cpu") == resolved


def test_cross_check_rejects_inconsistent_batch() -> None:
    ds = load_ds_config(DS_DIR / "zero1_bf16.json", ["--ds.train_batch_size=100"])
    with pytest.raises(ValueError, match="train_batch_size=100"):
        resolve_ds_config(ds, world_size=2, device_type="cuda")
    ds = load_ds_config(DS_DIR / "zero1_bf16.json", ["--ds.gradient_accumulation_steps=4"])
    assert resolve_ds_config(ds, world_size=2, device_type="cuda")["train_batch_size"] == 64 * 4 * 2


def deepspeed_view(ds: dict[str, Any], world_size: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    """DeepSpeed's own parse + sanity check, as if in a job of `world_size` ranks (no process group needed:
    DeepSpeedConfig asks deepspeed.comm for rank and world size, which we answer)."""
    from deepspeed.runtime import config as ds_config_module

    monkeypatch.setattr(ds_config_module.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(ds_config_module.dist, "get_world_size", lambda *a, **k: world_size)
    return ds_config_module.DeepSpeedConfig(copy.deepcopy(ds))


@pytest.mark.parametrize("path", FILES, ids=ids(FILES))
def test_deepspeed_validates(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = load_ds_config(path)
    resolved = resolve_ds_config(ds, world_size=4, device_type="cuda")
    view = deepspeed_view(resolved, 4, monkeypatch)
    assert view.world_size == 4 and view.train_batch_size == 256
    assert view.train_micro_batch_size_per_gpu == 64 and view.gradient_accumulation_steps == 1
    assert view.gradient_clipping == ds["gradient_clipping"]
    assert view.zero_optimization_stage == zero_stage(ds)
    assert view.float16_config.enabled == (precision(ds) == "fp16")
    assert view.bfloat16_config.enabled == (precision(ds) == "bf16")
    fields = {f.alias or name: name for name, f in type(view.zero_config).model_fields.items()}
    for key, value in ds["zero_optimization"].items():  # DeepSpeed read each key as written
        got = getattr(view.zero_config, fields[key])  # stage3_* keys are aliases of the field names
        assert (got.model_dump(exclude_unset=True) if hasattr(got, "model_dump") else got) == value, key


RECIPE_JSONS = sorted({Path(c).resolve() for c in (load_config(y).train.ds_config
                                           for y in sorted((DS_DIR.parent / "launch" / "configs").glob("*.yaml")))
                        if c})


def test_recipe_jsons_were_found() -> None:
    assert len(RECIPE_JSONS) >= 3, RECIPE_JSONS  # an empty parametrize would pass by running nothing


@pytest.mark.parametrize("path", RECIPE_JSONS, ids=[p.name for p in RECIPE_JSONS])
def test_recipe_jsons_validate(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every JSON a launch/configs recipe names (including copies kept next to a recipe) passes both checks."""
    ds = load_ds_config(path)
    assert "gradient_clipping" in ds
    resolved = resolve_ds_config(ds, world_size=2, device_type="cuda")
    view = deepspeed_view(resolved, 2, monkeypatch)
    assert view.gradient_clipping == ds["gradient_clipping"]
    assert view.train_batch_size == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2


def test_a_typo_is_rejected_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """megaface checks sub-sections with DeepSpeed's own strict models, before DeepSpeed starts."""
    with pytest.raises(ValueError, match="did you mean 'zero_optimization.overlap_comm'"):
        load_ds_config(DS_DIR / "zero2_bf16.json", ["--ds.zero_optimization.overlap_com=true"])


def test_readme_documents_every_key() -> None:
    readme = (DS_DIR / "README.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_.]+)` \|", readme, re.M))
    used = set().union(*(flat_keys(load_ds_config(p)) for p in FILES))
    # a section name ("fp16", "zero_optimization.offload_optimizer") is documented through its keys
    sections = {k for k in used if any(u.startswith(k + ".") for u in used)}
    assert used - sections <= documented, sorted(used - sections - documented)
    for path in FILES:
        assert f"`{path.name}`" in readme, path.name


# ---- each file drives a real DeepSpeed engine on 2 gloo ranks ---------------------------------------------

def _toy() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def _train_with(state: Any, configs: list[dict[str, Any]]) -> list[list[torch.Tensor]]:
    """Train the toy on this rank's half of each batch under every config; return the final weights."""
    import deepspeed
    from deepspeed.runtime.zero import GatheredParameters

    skip_shm_build()  # as the trainer does: no C++ compiler needed
    deepspeed.init_distributed(dist_backend="gloo")
    out = []
    for ds in configs:
        model = _toy()
        engine, *_ = deepspeed.initialize(model=model, optimizer=_sgd(model), config=ds)
        dtype = next(engine.parameters()).dtype
        half = 8 // state.world_size
        for step in range(3):
            x, y = _batch(step)
            x, y = x[state.rank * half:(state.rank + 1) * half], y[state.rank * half:(state.rank + 1) * half]
            loss = torch.nn.functional.cross_entropy(engine(x.to(dtype)).float(), y)
            engine.backward(loss)
            engine.step()
        params = list(engine.module.parameters())
        with GatheredParameters(params, enabled=zero_stage(ds) == 3):
            out.append([p.detach().float().clone() for p in params])
    return out


def check_train_like_averaged_sgd(paths: list[Path]) -> None:
    """Each file on 2 ranks == one process doing SGD on the whole 8-sample batch (ZeRO and offload change
    where state lives, not the maths)."""
    reference = _toy()
    opt = _sgd(reference)
    for step in range(3):
        x, y = _batch(step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(reference(x), y).backward()
        opt.step()
    expected = [p.detach() for p in reference.parameters()]
    configs = [resolve_ds_config(load_ds_config(p, ["--ds.train_micro_batch_size_per_gpu=4"]), 2, "cpu")
               for p in paths]
    for rank_results in run_distributed(_train_with, 2, configs):
        for path, ds, params in zip(paths, configs, rank_results):
            tol = 1e-6 if precision(ds) == "fp32" else 1e-2  # bf16 weights: 8 mantissa bits
            for got, want in zip(params, expected):
                torch.testing.assert_close(got, want, atol=tol, rtol=0, msg=path.name)


@pytest.mark.timeout(300)
def test_cpu_files_train_like_averaged_sgd() -> None:
    """Every fp32/bf16 file; fp16 files are refused on CPU by DeepSpeed and exercised on GPUs only."""
    check_train_like_averaged_sgd([p for p in FILES if NAME.match(p.name)["precision"] != "fp16"])
