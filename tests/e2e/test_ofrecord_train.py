"""Round trip: RecordIO pack -> `megaface pack ofrecord` -> `megaface train` (data.source=ofrecord, validating
on an OFRecord verification dir) -> `megaface eval` on that dir. Training on the OFRecord copy must give the
very losses of training on the RecordIO pack, and eval must print what it prints for the .bin."""

from __future__ import annotations

import contextlib
import io
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import deepspeed  # noqa: F401  - imported once, before the run
import pytest
import torch

from megaface.data import open_pack
from megaface.data.cli import main as pack_main
from megaface.distributed import DistState
from tests.conftest import tiny_args, train_worker, wrapped


def _validating_train(state: DistState, argv: list[str]) -> dict[str, Any]:
    from megaface.eval import validation

    names: list[list[str]] = []

    def recording(original: Callable[..., Any]) -> Callable[..., Any]:
        def record(self, model, iteration, log=print):  # type: ignore[no-untyped-def]
            out = original(self, model, iteration, log=lambda *_: None)
            names.append(sorted(out))
            return out
        return record

    with wrapped(validation.Validator, "run", recording):
        result = train_worker(state, argv)
    return {**result, "validated": names}


def _one_process(fn: Callable[[DistState, list[str]], dict[str, Any]], argv: list[str]) -> dict[str, Any]:
    """`fn(DistState(), argv)` in a fresh forked process: DeepSpeed keeps process-group state between two
    trainings in one process (a second `megaface train` there fails with 'Group ... is not registered')."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        return pool.submit(fn, DistState(), argv).result()


def _eval(argv: list[str]) -> list[str]:
    from megaface.eval import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main_eval(argv)
    return out.getvalue().splitlines()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_data_from_config(tmp_path: Path) -> None:
    """data.source=ofrecord wiring without a training run: part keys, head.num_classes, the gather hook."""
    from megaface.config import load_config
    from megaface.data import encode_jpeg
    from megaface.data.ofrecord import OFRecordDataset, encode_record
    from megaface.data.ofrecord_pack import write_parts
    from megaface.train.build import _training_data

    images = [encode_jpeg(torch.full((8, 8, 3), i * 20, dtype=torch.uint8).numpy()) for i in range(6)]
    write_parts(tmp_path / "d", 6, (encode_record({"encoded": im, "label": i % 3}) for i, im in enumerate(images)),
                parts=3, suffix_length=2)
    base = ["--data.source=ofrecord", f"--data.path={tmp_path / 'd'}", "--train.max_steps=1"]
    ds, bins = _training_data(load_config(None, [*base, "--data.part_num=2"]), DistState(), print)
    assert isinstance(ds, OFRecordDataset) and bins == [] and len(ds) == 4 and ds.num_classes == 3
    assert [p.name for p in ds.part_paths] == ["part-00", "part-01"]
    ds, _ = _training_data(load_config(None, [*base, "--head.num_classes=100"]), DistState(), print)
    assert ds.num_classes == 100 and len(ds) == 6
    with pytest.raises(FileNotFoundError, match="part-000 is missing"):
        _training_data(load_config(None, [*base, "--data.part_name_suffix_length=3"]), DistState(), print)
    with pytest.raises(ValueError, match="data.part_num=4 applies to data.source=ofrecord only"):
        load_config(None, ["--data.source=folder", f"--data.path={tmp_path}", "--data.part_num=4",
                           "--train.max_steps=1"])
    with pytest.raises(ValueError, match=r"data.part_name_suffix_length=0 is out of range: it must lie in \[1, 64\]"):
        load_config(None, [*base, "--data.part_name_suffix_length=0"])
    with pytest.raises(ValueError, match="data.source='ofrecord' needs data.path"):
        load_config(None, ["--data.source=ofrecord", "--train.max_steps=1"])


def test_eval_on_an_ofrecord_dir_matches_the_bin(tmp_path: Path) -> None:
    import json

    import numpy as np

    from megaface.data import encode_jpeg, save_bin
    from megaface.models import build_model

    torch.manual_seed(0)
    torch.save(build_model("mobilefacenet_tiny").state_dict(), tmp_path / "b.pt")
    (tmp_path / "b.pt.json").write_text(json.dumps({"network": "mobilefacenet_tiny", "embedding_size": 128}))
    rng = np.random.default_rng(0)
    images = [encode_jpeg(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(8)]
    save_bin(tmp_path / "lfw.bin", images, [True, False, True, False])
    assert pack_main(["ofrecord", "--input", str(tmp_path / "lfw.bin"), "--output", str(tmp_path / "lfw_of"),
                      "--parts", "2"]) == 0
    lines = _eval(["--checkpoint", str(tmp_path / "b.pt"), "--bin", str(tmp_path / "lfw_of"),
                   str(tmp_path / "lfw.bin"), "--batch-size", "8", "--folds", "2"])
    assert lines[0] == "Validation on [lfw_of]:" and lines[4] == "Validation on [lfw]:"
    assert lines[1] == "Embedding shape: (8, 128)" and lines[1:4] == lines[5:8]


@pytest.mark.slow
def test_recordio_to_ofrecord_train_and_eval(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    small = ("--data.synthetic.identities=8", "--data.synthetic.images_per_identity=4",
             "--head.margin=[1, 0, 0]", "--head.scale=8")
    reference = _one_process(train_worker, tiny_args(cache, tmp_path / "rec", 4, *small))
    assert reference["code"] == 0
    (pack_dir,) = [p.parent for p in cache.glob("*/train.rec")]
    (bin_path,) = cache.glob("*/val.bin")

    assert pack_main(["ofrecord", "--input", str(pack_dir), "--output", str(tmp_path / "of_train"),
                      "--parts", "3"]) == 0
    assert pack_main(["ofrecord", "--input", str(bin_path), "--output", str(tmp_path / "val_of"),
                      "--suffix-length", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "of_train").iterdir()) == ["part-00000", "part-00001", "part-00002"]
    rec, of = open_pack(pack_dir), open_pack(tmp_path / "of_train")
    assert of.num_classes == rec.num_classes == 8
    assert [of[i] for i in range(len(of))] == [rec[i] for i in range(len(rec))]

    argv = tiny_args(cache, tmp_path / "of", 4, *small, "--data.source=ofrecord",
                     f"--data.path={tmp_path / 'of_train'}", "--data.part_name_suffix_length=5",
                     f"--validation.bins=[{tmp_path / 'val_of'}]", "--validation.interval=4",
                     "--validation.synthetic=false")
    result = _one_process(_validating_train, argv)
    assert result["code"] == 0 and result["validated"] == [["val_of"]]
    assert result["losses"] == reference["losses"]  # same records, same order, same loader seed

    lines = _eval(["--checkpoint", str(tmp_path / "of"), "--bin", str(tmp_path / "val_of"), str(bin_path),
                   "--batch-size", "16"])
    assert lines[0] == "Validation on [val_of]:" and lines[4] == "Validation on [val]:"
    assert lines[1:4] == lines[5:8]  # embedding shape, XNorm, Accuracy-Flip: the same set, the same numbers
