"""The seed's flags: Partial FC by count (head.num_sample), a start from imported weights (model.init_from),
and the seed scripts' positional arguments (nodes, GPUs per node, per-GPU batch, node IPs, model load dir)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from megaface.config import load_config
from megaface.train.build import load_initial_weights, sample_rate_of

ROOT = Path(__file__).resolve().parents[2]


def test_num_sample_is_the_seeds_count_form_of_the_rate() -> None:
    cfg = load_config(None, ["--head.num_sample=8568", "--train.max_steps=1"])
    assert cfg.head.num_sample == 8568
    assert sample_rate_of(cfg.head.sample_rate, cfg.head.num_sample, 85744) == pytest.approx(0.0999253)
    assert sample_rate_of(0.25, None, 85744) == 0.25
    with pytest.raises(ValueError, match="head.num_sample=90000 exceeds the 85744 classes"):
        sample_rate_of(1.0, 90000, 85744)
    with pytest.raises(ValueError, match="set head.num_sample=8568 or head.sample_rate=0.1, not both"):
        load_config(None, ["--head.num_sample=8568", "--head.sample_rate=0.1", "--train.max_steps=1"])
    with pytest.raises(ValueError, match="head.num_sample=0 is out of range"):
        load_config(None, ["--head.num_sample=0", "--train.max_steps=1"])


def test_init_from_loads_a_backbone_file_strictly(tmp_path: Path) -> None:
    from megaface.checkpoint import save_backbone_file
    from megaface.models import build_model

    torch.manual_seed(0)
    source = build_model("mobilefacenet_tiny")
    path = save_backbone_file(tmp_path / "y.safetensors", source.state_dict(),
                              {"network": "mobilefacenet_tiny", "embedding_size": source.embedding_size})
    target = build_model("mobilefacenet_tiny")
    load_initial_weights(target, str(path), "mobilefacenet_tiny")
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key
    with pytest.raises(ValueError, match="holds a 'mobilefacenet_tiny' backbone, not 'iresnet18'"):
        load_initial_weights(build_model("iresnet18"), str(path), "iresnet18")
    cfg = load_config(None, [f"--model.init_from={path}", "--train.max_steps=1"])
    assert cfg.model.init_from == str(path)


def _dry_run(*args: str, **env: str) -> list[str]:
    result = subprocess.run(["bash", str(ROOT / "launch" / "train_r100_mp_pfc.sh"), *args], cwd=ROOT,
                            env={**os.environ, "DRY_RUN": "1", **env}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


def test_seed_positional_arguments(tmp_path: Path) -> None:
    backbone = tmp_path / "r100.safetensors"
    backbone.write_bytes(b"")
    command = _dry_run("2", "8", "64", "10.0.0.2,10.0.0.3,10.0.0.4", str(backbone), "--max-steps", "5")[-1]
    assert "--num_nodes 2 --num_gpus 8" in command and "--master_addr 10.0.0.2" in command
    assert "--ds.train_micro_batch_size_per_gpu=64" in command
    assert f"--model.init_from={backbone}" in command and command.endswith("--max-steps 5")
    hostfile = Path(command.split("--hostfile ")[1].split()[0])
    assert hostfile.read_text() == "10.0.0.2 slots=8\n10.0.0.3 slots=8\n"
    # a OneFlow snapshot directory is imported first (for the CONFIG's network), then trained from
    snapshot = tmp_path / "snapshot_150000"
    snapshot.mkdir()
    lines = _dry_run("1", "2", "32", "127.0.0.1", str(snapshot), OUTPUT=str(tmp_path / "run"))
    assert lines[0].startswith("python -m megaface convert import-oneflow") and "--network iresnet100" in lines[0]
    assert f"--model.init_from={tmp_path}/run/imported_snapshot_150000_iresnet100.safetensors" in lines[-1]


def test_seed_positional_arguments_are_checked() -> None:
    result = subprocess.run(["bash", str(ROOT / "launch" / "train_r100_mp_pfc.sh"), "3", "8", "64", "10.0.0.2"],
                            cwd=ROOT, env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "NODE_IPS='10.0.0.2' lists 1 address(es) for NODES=3" in result.stderr
