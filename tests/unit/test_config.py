"""Experiment config and DeepSpeed JSON checks (pure: no process group, no DeepSpeed engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megaface.config import (
    ExperimentConfig,
    check_optimizer_single_source,
    field_docs,
    load_config,
    load_ds_config,
    parse_override,
    precision,
    resolve_ds_config,
)
from megaface.train.cli import parse_args

ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_need_a_length_and_overrides_win(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_steps"):
        load_config(None)
    yaml_file = _write(tmp_path / "e.yaml", "train:\n  max_steps: 10\noptim:\n  lr: 0.2\n")
    cfg = load_config(yaml_file, ["--optim.lr=0.05", "--head.margin=[1, 0.3, 0.2]"])
    assert cfg.train.max_steps == 10  # file over default
    assert cfg.optim.lr == 0.05  # CLI over file
    assert cfg.optim.momentum == 0.9  # default
    assert cfg.head.margin == (1.0, 0.3, 0.2)


@pytest.mark.parametrize("key, near", [("train.max_step", "train.max_steps"), ("optim.learning_rate", None),
                                       ("modle.network", "model"), ("head.sample_rat", "head.sample_rate")])
def test_unknown_key_names_nearest(tmp_path: Path, key: str, near: str | None) -> None:
    section, name = key.split(".")
    yaml_file = _write(tmp_path / "e.yaml", f"train:\n  max_steps: 1\n{section}:\n  {name}: 1\n")
    with pytest.raises(ValueError) as info:
        load_config(yaml_file)
    message = str(info.value)
    assert (key if section != "modle" else "modle") in message
    if near:
        assert f"did you mean '{near}'" in message
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(None, ["--train.max_steps=1", f"--{key}=1"])


def test_types_and_choices_are_validated() -> None:
    base = ["--train.max_steps=1"]
    with pytest.raises(ValueError, match="train.max_steps: expected an integer"):
        load_config(None, ["--train.max_steps=abc"])
    with pytest.raises(ValueError, match="head.parallel"):
        load_config(None, [*base, "--head.parallel=tensor"])
    with pytest.raises(ValueError, match="exactly one"):
        load_config(None, [*base, "--train.epochs=2"])
    with pytest.raises(ValueError, match="sample_rate"):
        load_config(None, [*base, "--head.sample_rate=0.1", "--head.parallel=data"])
    with pytest.raises(ValueError, match="expected 3 values"):
        load_config(None, [*base, "--head.margin=[1, 0.5]"])


def test_relative_paths_resolve_against_the_yaml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = tmp_path / "configs"
    sub.mkdir()
    yaml_file = _write(sub / "e.yaml", "train:\n  max_steps: 1\n  ds_config: ../ds/z.json\n"
                                       "validation:\n  bins: [lfw.bin, /abs/x.bin]\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(yaml_file, ["--train.output_dir=runs/a"])
    assert Path(cfg.train.ds_config) == (sub / "../ds/z.json").resolve().parent / "z.json" or \
        Path(cfg.train.ds_config) == sub / "../ds/z.json"
    assert cfg.validation.bins == [str(sub / "lfw.bin"), "/abs/x.bin"]
    assert cfg.train.output_dir == str(tmp_path / "runs/a")  # CLI paths: the working directory


def test_every_field_has_a_docstring() -> None:
    docs = field_docs()
    cfg = ExperimentConfig().to_dict()
    keys = [f"{s}.{k}" for s, sec in cfg.items() for k, v in sec.items() if not isinstance(v, dict)]
    missing = [k for k in keys if k not in docs]
    assert not missing and len(docs) >= len(keys)


def test_shipped_recipes_load() -> None:
    recipes = sorted((ROOT / "launch" / "configs").glob("*.yaml"))
    assert len(recipes) >= 10, recipes
    for yaml_file in recipes:
        cfg = load_config(yaml_file)
        if cfg.train.ds_config:
            assert Path(cfg.train.ds_config).is_file(), yaml_file


def test_cli_flags_become_overrides() -> None:
    args, overrides, ds = parse_args(["--config", "x.yaml", "--max-steps", "5", "--output", "o",
                                      "--model.network=iresnet50", "--ds.train_micro_batch_size_per_gpu=8"])
    assert args.config == "x.yaml"
    assert "--train.max_steps=5" in overrides and "--train.output_dir=o" in overrides
    assert "--model.network=iresnet50" in overrides and ds == ["--ds.train_micro_batch_size_per_gpu=8"]
    with pytest.raises(SystemExit):
        parse_args(["--bogus"])
    assert parse_override("--a.b=[1, 2]") == (["a", "b"], [1, 2])


# ---- DeepSpeed JSON ---------------------------------------------------------------------------------------

def _ds(tmp_path: Path, **values) -> Path:
    body = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "gradient_clipping": 0.0,
            **values}
    return _write(tmp_path / "ds.json", json.dumps({k: v for k, v in body.items() if v is not None}))


def test_ds_batch_cross_check_names_the_numbers(tmp_path: Path) -> None:
    ds = load_ds_config(_ds(tmp_path, train_batch_size=64))
    with pytest.raises(ValueError) as info:
        resolve_ds_config(ds, world_size=2, device_type="cpu")
    for number in ("64", "8", "2", "32"):
        assert number in str(info.value)
    ok = resolve_ds_config(load_ds_config(_ds(tmp_path)), world_size=2, device_type="cpu")
    assert ok["train_batch_size"] == 32 and ok["zero_allow_untested_optimizer"] is True


def test_ds_overrides_fp16_on_cpu_and_clipping(tmp_path: Path) -> None:
    ds = load_ds_config(_ds(tmp_path), ["--ds.train_micro_batch_size_per_gpu=4", "--ds.fp16.enabled=true",
                                        "--ds.zero_optimization.stage=1"])
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["zero_optimization"]["stage"] == 1
    assert precision(ds) == "fp16"
    with pytest.raises(ValueError, match="fp16.*CPU"):
        resolve_ds_config(ds, world_size=1, device_type="cpu")
    resolve_ds_config(ds, world_size=1, device_type="cuda")  # fine on a GPU
    with pytest.raises(ValueError, match="gradient_clipping"):
        resolve_ds_config(load_ds_config(_ds(tmp_path, gradient_clipping=None)), 1, "cpu")
    with pytest.raises(ValueError, match="'optimizer' section disagrees"):  # the one check of that section
        check_optimizer_single_source(load_config(None, ["--train.max_steps=1"]),
                                      load_ds_config(_ds(tmp_path, optimizer={"type": "Adam"})))
    with pytest.raises(ValueError, match="'scheduler' section"):
        resolve_ds_config(load_ds_config(_ds(tmp_path, scheduler={"type": "WarmupLR"})), 1, "cpu")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_ds_config(tmp_path / "nope.json")


def test_shipped_ds_configs_resolve() -> None:
    jsons = sorted((ROOT / "ds_configs").glob("*.json"))
    assert len(jsons) >= 10, jsons
    for path in jsons:
        ds = load_ds_config(path)
        if precision(ds) != "fp16":
            resolve_ds_config(ds, world_size=2, device_type="cpu")


def test_print_config_shows_every_key_with_its_meaning(capsys: pytest.CaptureFixture[str]) -> None:
    from megaface.train.cli import main

    assert main(["--config", str(ROOT / "launch/configs/quickstart.yaml"), "--print-config",
                 "--ds.train_micro_batch_size_per_gpu=16"]) == 0
    text = capsys.readouterr().out
    assert 'network: "mobilefacenet_tiny"  # Registry name' in text
    assert '"train_micro_batch_size_per_gpu": 16' in text
    from megaface.cli import main as cli_main

    assert cli_main(["train", "--config", str(ROOT / "launch/configs/quickstart.yaml"), "--modle.network=x"]) == 2
    assert "did you mean 'model'" in capsys.readouterr().err


@pytest.mark.parametrize("partial_fc", ["--head.sample_rate=0.5", "--head.num_sample=4"])
def test_partial_fc_with_a_data_parallel_head_is_refused_once_at_load(partial_fc: str, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from megaface.cli import main as cli_main

    assert cli_main(["train", "--config", str(ROOT / "launch/configs/quickstart.yaml"), "--head.parallel=data",
                     partial_fc, f"--train.output_dir={tmp_path / 'o'}"]) == 2
    assert capsys.readouterr().err.strip() == ("megaface train: error: head.sample_rate < 1 or head.num_sample "
                                               "(Partial FC) needs head.parallel=model")
    assert not (tmp_path / "o").exists()
