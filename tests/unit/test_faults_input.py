"""Bad input: DeepSpeed JSON typos and types, numeric ranges, damaged packs and records, NaN features.

Each case asserts the one-line message (key or file, value, constraint) and, through the CLI, the exit code.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from megaface import cli
from megaface.config import load_config, load_ds_config, resolve_ds_config
from megaface.data import CorruptImageError, DataError, PackWriter, TrainLoader, encode_jpeg, open_pack
from megaface.data.recordio import RecordWriter, pack_payload
from megaface.eval.validation import check_validation_packs

_BASE = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0}


def _ds(tmp_path: Path, extra: dict) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**_BASE, **extra}))
    return path


@pytest.mark.parametrize("extra, message", [
    ({"zero_optimisation": {"stage": 2}}, "unknown key 'zero_optimisation'; did you mean 'zero_optimization'?"),
    ({"gradient_acumulation_steps": 2},
     "unknown key 'gradient_acumulation_steps'; did you mean 'gradient_accumulation_steps'?"),
    ({"zero_optimization": {"stgae": 1}},
     "unknown key 'zero_optimization.stgae'; did you mean 'zero_optimization.stage'?"),
    ({"fp16": {"enabeld": True}}, "unknown key 'fp16.enabeld'; did you mean 'fp16.enabled'?"),
    ({"zero_optimization": {"offload_param": {"devce": "cpu"}}},
     "did you mean 'zero_optimization.offload_param.device'?"),
    ({"bf16": True}, '"bf16" must be an object such as {"enabled": true}, got true'),
    ({"zero_optimization": 2}, '"zero_optimization" must be an object such as {"stage": 2}, got 2'),
    ({"zero_optimization": {"stage": "two"}}, '"zero_optimization.stage": "two" is invalid'),
    ({"train_micro_batch_size_per_gpu": "64"}, '"train_micro_batch_size_per_gpu" must be an integer, got "64"'),
    ({"gradient_clipping": "1.0"}, '"gradient_clipping" must be a number, got "1.0"'),
])
def test_ds_json_typos_and_types(tmp_path: Path, extra: dict, message: str) -> None:
    path = _ds(tmp_path, extra)
    with pytest.raises(ValueError) as info:
        load_ds_config(path)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


def test_ds_json_valid_keys_and_aliases_pass(tmp_path: Path) -> None:
    ds = load_ds_config(_ds(tmp_path, {"bf16": {"enabled": True}, "wall_clock_breakdown": False,
                                       "zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1e9,
                                                             "offload_param": {"device": "cpu"}}}))
    assert resolve_ds_config(ds, 2, "cuda")["train_batch_size"] == 8
    with pytest.raises(ValueError, match="did you mean 'bf16'"):  # an override is checked like the file
        load_ds_config(_ds(tmp_path, {}), ["--ds.bf17.enabled=true"])
    with pytest.raises(ValueError, match='"bf16" must be an object'):  # a dict built in code, not a file
        resolve_ds_config({**_BASE, "bf16": True}, 1, "cpu")


@pytest.mark.parametrize("override, message", [
    ("--optim.gamma=-0.1", "optim.gamma=-0.1 is out of range: it must lie in (0, inf)"),
    ("--optim.warmup_steps=-5", "optim.warmup_steps=-5 is out of range: it must lie in [0, inf)"),
    ("--data.workers=-1", "data.workers=-1 is out of range: it must lie in [0, 256]"),
    ("--optim.momentum=1.5", "optim.momentum=1.5 is out of range: it must lie in [0, 1)"),
    ("--head.margin=[1,0.5,-0.2]", "head.margin[2]=-0.2 is out of range"),
    ("--optim.milestones=[0,5]", "optim.milestones[0]=0 is out of range"),
    ("--optim.lr=.nan", "optim.lr=nan is not a finite number"),
    ("--validation.batch_size=0", "validation.batch_size=0 is out of range: it must lie in [1, inf)"),
])
def test_numeric_ranges(override: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        load_config(None, ["--train.max_steps=10", override])
    assert message in str(info.value)


def test_suspicious_value_warns_and_range_error_exits_2(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.warns(UserWarning, match="optim.gamma=2.0: the learning rate grows"):
        load_config(None, ["--train.max_steps=10", "--optim.gamma=2"])
    config = tmp_path / "exp.yaml"
    config.write_text("optim:\n  gamma: -1\ntrain:\n  max_steps: 5\n")
    assert cli.main(["train", "--config", str(config), f"--train.output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("megaface train: error: optim.gamma=-1.0 is out of range: it must lie in (0, inf); "
                   "fix it in the YAML or with --optim.gamma=...")
    assert not (tmp_path / "o").exists()


def _bin(path: Path, images: list[bytes], issame: list[bool]) -> Path:
    with open(path, "wb") as fh:
        pickle.dump((images, issame), fh)
    return path


def test_validation_packs_checked_at_start(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = [encode_jpeg(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(4)]
    assert check_validation_packs([_bin(tmp_path / "lfw.bin", good, [True, False])]) == {"lfw": 2}
    bad_last = _bin(tmp_path / "cfp.bin", good[:3] + [good[3][:40]], [True, False])
    with pytest.raises(ValueError, match=r"verification pack .*cfp\.bin: image 3 of 4 \(pair 1\) cannot be decoded"):
        check_validation_packs([tmp_path / "lfw.bin", bad_last])
    small = encode_jpeg(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"agedb\.bin: image 3 is \(96, 96, 3\) but image 0 is \(112, 112, 3\)"):
        check_validation_packs([_bin(tmp_path / "agedb.bin", good[:3] + [small], [True, False])])
    with pytest.raises(ValueError, match=r"odd\.bin: 3 images"):
        check_validation_packs([_bin(tmp_path / "odd.bin", good[:3], [True])])
    (tmp_path / "trunc.bin").write_bytes((tmp_path / "lfw.bin").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"trunc\.bin: not a readable \.bin"):
        check_validation_packs([tmp_path / "trunc.bin"])
    with pytest.raises(FileNotFoundError, match="never skipped silently"):
        check_validation_packs([tmp_path / "missing.bin"])


def _raw_pack(path: Path, labels: list[float], keys: list[int] | None = None, classes: int = 2) -> Path:
    """A header-less pack written record by record (so labels and keys can be anything)."""
    path.mkdir()
    rng = np.random.default_rng(1)
    keys = keys or list(range(len(labels)))
    with RecordWriter(path / "train.rec", path / "train.idx") as writer:
        for key, label in zip(keys, labels, strict=False):
            image = encode_jpeg(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
            writer.write(key, pack_payload(float(label), image, id=key))
    (path / "property").write_text(f"{classes},112,112\n")
    return path


def test_float_label_and_duplicate_idx_keys(tmp_path: Path) -> None:
    pack = open_pack(_raw_pack(tmp_path / "f", [0, 1, 1.5, 0]))
    with pytest.raises(ValueError, match=r"train\.rec: key 2 \(offset \d+\) has label 1\.5, not an integer"):
        pack[2]
    with pytest.raises(ValueError, match=r"train\.idx: key 1 appears twice \(lines 2 and 3\)"):
        open_pack(_raw_pack(tmp_path / "d", [0, 1, 1, 0], keys=[0, 1, 1, 2]))


def _jpeg_pack(path: Path, corrupt: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    with PackWriter(path) as writer:
        for k in range(8):
            data = encode_jpeg(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
            writer.add(k // 4, data[:60] if k == corrupt else data)
    return path


def test_worker_data_errors_arrive_as_one_line(tmp_path: Path) -> None:
    pack = open_pack(_jpeg_pack(tmp_path / "c", corrupt=5))
    with pytest.raises(CorruptImageError) as info:
        list(TrainLoader(pack, 4, workers=1))
    text = str(info.value)
    assert "\n" not in text and "Traceback" not in text and "DataLoader worker" not in text
    assert "train.rec: key 6 at offset" in text and "data.skip_corrupt=true" in text
    # a damaged record (the .idx points into the middle of a record): file, key, offset and reason
    good = _jpeg_pack(tmp_path / "g")
    lines = (good / "train.idx").read_text().splitlines()
    key, offset = lines[3].split("\t")
    lines[3] = f"{key}\t{int(offset) + 12}"
    (good / "train.idx").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        list(TrainLoader(open_pack(good), 4, workers=1))
    text = str(info.value)
    assert "\n" not in text and f"key {key} at offset {int(offset) + 12}: bad magic" in text


def test_skip_corrupt_key_and_class_count_warning(tmp_path: Path) -> None:
    assert load_config(None, ["--train.max_steps=1", "--data.skip_corrupt=true"]).data.skip_corrupt is True
    logs: list[str] = []
    pack = open_pack(_jpeg_pack(tmp_path / "c", corrupt=5))
    loader = TrainLoader(pack, 4, workers=0, skip_corrupt=True, log=logs.append)
    assert len(list(loader)) == 2 and loader.skipped == 1 and "skipped 1 corrupt image(s) (1 so far)" in logs[0]
    (tmp_path / "c" / "property").write_text("5,112,112\n")  # header says 2 identities: an error
    with pytest.raises(ValueError, match="header record lists 2 identities .* says 5 classes"):
        open_pack(tmp_path / "c")
    loose = _raw_pack(tmp_path / "loose", [0, 0, 1, 1], classes=4)  # no header: only the labels tell
    logs.clear()
    list(TrainLoader(open_pack(loose), 2, workers=0, log=logs.append))
    assert any("declares 4 classes but the labels of one epoch use 2 of them (up to 1)" in line for line in logs)


def test_nan_features_are_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    probe = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    probe[4, 2] = np.nan
    np.save(tmp_path / "probe.npy", probe)
    np.save(tmp_path / "probe.labels.npy", np.arange(6))
    np.save(tmp_path / "gallery.npy", np.abs(probe) + 1)
    np.save(tmp_path / "gallery.labels.npy", np.arange(6))
    code = cli.main(["eval-ident", "--probe", str(tmp_path / "probe.npy"), "--gallery", str(tmp_path / "gallery.npy")])
    err = capsys.readouterr().err
    assert code == 2 and "probe.npy: row 4 holds NaN or infinite values" in err and err.count("\n") == 1
    code = cli.main(["eval-ijb", "--features", str(tmp_path / "probe.npy"), "--meta-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--features" in err and "row 4 holds NaN" in err


def test_every_numeric_field_has_a_documented_range() -> None:
    import dataclasses
    import typing

    from megaface.config import ExperimentConfig, field_docs
    from megaface.config.ranges import RANGES

    def numeric_fields(cls: type, prefix: str) -> list[str]:
        out = []
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                out += numeric_fields(hint, f"{prefix}{f.name}.")
            elif {int, float} & set(typing.get_args(hint) or (hint,)):
                out.append(prefix + f.name)
        return out

    fields = numeric_fields(ExperimentConfig, "")
    covered = {key.split("[")[0] for key in RANGES}
    assert len(fields) > 25 and not set(fields) - covered, sorted(set(fields) - covered)
    docs = field_docs()
    assert all("range " in docs[name] for name in fields)
