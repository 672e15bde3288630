"""OneFlow interop on files oneflow_face's own converters wrote (commit b144e82, tools/model_convert and
tools/dataset_convert; see tests/fixtures/interop/make.sh), against MXNet's own forward and MXNet's reading
of the source packs (manifest.json).

Opt-in: MEGAFACE_MXNET_PYTHON (a Python with mxnet 1.9.1) and MEGAFACE_ONEFLOW_FACE (an oneflow_face
checkout at b144e82) run oneflow_face's OneFlow -> MXNet converter on megaface's export.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from megaface.checkpoint import load_backbone
from megaface.convert.mxnet import import_mxnet
from megaface.convert.oneflow import export_oneflow, import_oneflow
from megaface.data import build_dataset, load_bin, open_pack
from megaface.data.ofrecord import decode_record, find_parts
from megaface.data.ofrecord_pack import pack_ofrecord
from megaface.eval.validation import read_bin
from tests.conftest import (
    FIXTURES,
    MIN_COSINE,
    MODELS,
    cosines,
    megaface_embeddings,
    params_or_skip,
    snapshot_or_skip,
)

SNAPSHOT = FIXTURES / "oneflow" / "y1_snapshot"
MANIFEST = json.loads((FIXTURES / "pack" / "manifest.json").read_text())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_backbone(path)[0].state_dict()


def test_fixture_is_the_converters_layout():
    """What tools/model_convert/mobilefacenet/mxnet_model_2_of_python.py writes: raw `out` files without
    `meta`, zero `-momentum` copies, a System-Train-TrainStep counter and MXNet's fix_gamma `fc1-gamma`."""
    names = {p.name for p in SNAPSHOT.iterdir()}
    assert "fc1-gamma" in names and "System-Train-TrainStep-insightface_train_job" in names
    assert "conv_1_relu-alpha-momentum" in names and "pre_fc1-bias" in names
    assert not any((SNAPSHOT / n / "meta").exists() for n in names)
    gamma = np.fromfile(SNAPSHOT / "fc1-gamma" / "out", np.float32)
    assert gamma.shape == (128,) and not np.allclose(gamma, 1)  # ignored by MXNet, so it must be by us too


def test_import_converter_snapshot_matches_mxnet(tmp_path):
    report = import_oneflow(SNAPSHOT, tmp_path / "of.safetensors", "mobilefacenet")
    assert "fc1-gamma ignored" in report
    reference = np.load(FIXTURES / "y1" / "embeddings.npy")
    assert cosines(megaface_embeddings(tmp_path / "of.safetensors"), reference).min() >= MIN_COSINE
    import_mxnet(FIXTURES / "y1" / "model", tmp_path / "mx.safetensors", "mobilefacenet")
    ours, via_mxnet = _state(tmp_path / "of.safetensors"), _state(tmp_path / "mx.safetensors")
    assert ours.keys() == via_mxnet.keys()
    assert all(torch.equal(ours[k], via_mxnet[k]) for k in ours)  # the converter copies bytes: lossless


@pytest.mark.parametrize("name", ["r18", *(pytest.param(n, marks=pytest.mark.slow) for n in ("r34", "r50", "r100"))])
def test_import_resnet_converter_snapshots_match_mxnet(tmp_path, name):
    """tools/model_convert/resnet100/mxnet_2_oneflow_model.py on the fresnets (committed as .tar.xz)."""
    prefix = params_or_skip(name, tmp_path)
    snapshot = snapshot_or_skip(name, tmp_path)
    import_oneflow(snapshot, tmp_path / "of.safetensors", MODELS[name])
    reference = np.load(FIXTURES / name / "embeddings.npy")
    assert cosines(megaface_embeddings(tmp_path / "of.safetensors"), reference).min() >= MIN_COSINE
    import_mxnet(prefix, tmp_path / "mx.safetensors", MODELS[name])
    ours, via_mxnet = _state(tmp_path / "of.safetensors"), _state(tmp_path / "mx.safetensors")
    assert all(torch.equal(ours[k], via_mxnet[k]) for k in via_mxnet)


def test_a_damaged_fc1_gamma_is_an_error(tmp_path):
    snapshot = tmp_path / "snap"
    shutil.copytree(SNAPSHOT, snapshot)
    (snapshot / "fc1-gamma" / "out").write_bytes(b"\0" * 12)
    with pytest.raises(ValueError, match=r"fc1-gamma: 3 values, expected 128"):
        import_oneflow(snapshot, tmp_path / "b.safetensors", "mobilefacenet")


def _converter_snapshot(name: str, tmp_path: Path) -> Path:
    return SNAPSHOT if name == "y1" else snapshot_or_skip(name, tmp_path)


@pytest.mark.parametrize("name, prelu", [("y1", "conv_1_relu-alpha"),
                                         pytest.param("r18", "relu0-alpha", marks=pytest.mark.slow)])
def test_export_import_round_trip_is_bit_exact_and_laid_out_like_oneflow(tmp_path, name, prelu):
    snapshot = _converter_snapshot(name, tmp_path)
    import_oneflow(snapshot, tmp_path / "of.safetensors", MODELS[name])
    export_oneflow(tmp_path / "of.safetensors", tmp_path / "export")
    exported = {p.name for p in (tmp_path / "export").iterdir() if p.is_dir()}
    converter = {p.name for p in snapshot.iterdir()
                 if not p.name.endswith("-momentum") and not p.name.startswith("System-")}
    assert exported == converter - {"fc1-gamma"}  # OneFlow's fc1 has no scale
    for variable in exported:  # same variables, same byte sizes; flow.checkpoint.save's meta next to each
        assert (tmp_path / "export" / variable / "out").stat().st_size == \
            (snapshot / variable / "out").stat().st_size
        assert "data_type: kFloat" in (tmp_path / "export" / variable / "meta").read_text()
    assert "dim: 64\n  dim: 1\n  dim: 1" in (tmp_path / "export" / prelu / "meta").read_text()
    assert (tmp_path / "export" / "snapshot_done").is_file()
    import_oneflow(tmp_path / "export", tmp_path / "back.safetensors", MODELS[name])
    before, after = _state(tmp_path / "of.safetensors"), _state(tmp_path / "back.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# oneflow_face's own OneFlow -> MXNet readers (b144e82): the mobilefacenet one, and the resnet100 one, which
# joins its snapshot path by string concatenation (hence the trailing slash)
_READERS = {"y1": ("mobilefacenet", ""), "r18": ("resnet100", "/")}


@pytest.mark.parametrize("name", list(_READERS))
def test_oneflow_faces_reader_reads_our_export(tmp_path, name):
    """export-oneflow -> oneflow_face's of_model_2_mxnet_model.py -> import-mxnet: bit-exact."""
    python, repo = os.environ.get("MEGAFACE_MXNET_PYTHON"), os.environ.get("MEGAFACE_ONEFLOW_FACE")
    if not python or not repo:
        pytest.skip("set MEGAFACE_MXNET_PYTHON (a Python with mxnet 1.9.1) and MEGAFACE_ONEFLOW_FACE (an "
                    "oneflow_face checkout at b144e82) to run oneflow_face's OneFlow -> MXNet converter")
    folder, slash = _READERS[name]
    script = Path(repo) / "tools" / "model_convert" / folder / "of_model_2_mxnet_model.py"
    prefix = params_or_skip(name, tmp_path)  # the reader takes the symbol and the names from an MXNet model
    import_oneflow(_converter_snapshot(name, tmp_path), tmp_path / "of.safetensors", MODELS[name])
    export_oneflow(tmp_path / "of.safetensors", tmp_path / "export")
    subprocess.run([python, str(script), "--mxnet_load_prefix", str(prefix),
                    "--mxnet_load_epoch", "0", "--mxnet_save_prefix", str(tmp_path / "mx" / "model"),
                    "--mxnet_save_epoch", "0", "--of_model_dir", f"{tmp_path / 'export'}{slash}"],
                   check=True, cwd=tmp_path, timeout=240, capture_output=True)
    import_mxnet(tmp_path / "mx" / "model", tmp_path / "back.safetensors", MODELS[name])
    before, after = _state(tmp_path / "of.safetensors"), _state(tmp_path / "back.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_training_parts_hold_the_source_packs_images():
    """ofrecord/train/part-0000{0,1,2}: mx_recordio_2_ofrecord_shuffled_npart.py (shuffled) of pack/."""
    want = sorted((item["label"], item["sha256"]) for item in MANIFEST["train"])
    ofrecord = build_dataset("ofrecord", FIXTURES / "ofrecord" / "train")
    assert [p.name for p in ofrecord.part_paths] == ["part-00000", "part-00001", "part-00002"]
    assert ofrecord.num_classes == MANIFEST["num_classes"] and len(ofrecord) == len(want)
    got = sorted((label, sha(image)) for label, image in (ofrecord[i] for i in range(len(ofrecord))))
    assert got == want
    assert sorted(ofrecord.labels().tolist()) == [label for label, _ in want]
    assert type(open_pack(FIXTURES / "ofrecord" / "train")) is type(ofrecord)
    recordio = open_pack(FIXTURES / "pack")  # and megaface's RecordIO reader on the source, in key order
    assert [(label, sha(image)) for label, image in (recordio[i] for i in range(len(recordio)))] == \
        [(item["label"], item["sha256"]) for item in MANIFEST["train"]]


def test_verification_part_holds_the_bin():
    """ofrecord/lfw/part-0: bin_2_ofrecord.py of pack/lfw.bin (a Python 2 pickle)."""
    images, issame = read_bin(FIXTURES / "ofrecord" / "lfw")
    assert [sha(image) for image in images] == MANIFEST["lfw"]["sha256"]
    assert issame == MANIFEST["lfw"]["issame"]
    bin_images, bin_issame = load_bin(FIXTURES / "pack" / "lfw.bin")
    assert [sha(bytes(image)) for image in bin_images] == MANIFEST["lfw"]["sha256"] and bin_issame == issame


def _records(directory: Path) -> list[dict]:
    """Every record of an OFRecord directory as {feature: (kind, values)}: protobuf leaves the order of map
    entries unspecified (oneflow_face's converter itself writes them in another order from run to run)."""
    out = []
    for path in find_parts(directory):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            size = int.from_bytes(data[pos:pos + 8], "little", signed=True)
            record = decode_record(data[pos + 8:pos + 8 + size], f"{path}:{pos}")
            pos += 8 + size
            out.append({key: (feature.WhichOneof("kind"), list(getattr(feature, feature.WhichOneof("kind")).value))
                        for key, feature in record.feature.items()})
    return out


def test_our_ofrecord_writer_writes_the_converters_records(tmp_path):
    """`megaface pack ofrecord` (pack_ofrecord) on the same sources writes the records oneflow_face's dataset
    converters wrote: same features, kinds (int32_list label/issame, bytes_list encoded) and values."""
    pack_ofrecord(FIXTURES / "pack" / "lfw.bin", tmp_path / "lfw", parts=1, suffix_length=1)
    assert _records(tmp_path / "lfw") == _records(FIXTURES / "ofrecord" / "lfw")
    pack_ofrecord(FIXTURES / "pack", tmp_path / "train", parts=3)
    theirs = sorted(_records(FIXTURES / "ofrecord" / "train"), key=repr)  # the converter shuffles: multisets
    assert sorted(_records(tmp_path / "train"), key=repr) == theirs and len(theirs) == len(MANIFEST["train"])
