"""`megaface eval` and `megaface embed` end to end on a small real backbone (mobilefacenet_tiny, 128-d)."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import re

import cv2
import numpy as np
import pytest
import torch

from megaface.distributed import DistState
from megaface.eval import cli
from megaface.eval.embed import embed_images
from megaface.eval.verification import evaluate
from tests.conftest import run_distributed


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the CPU is shared; one thread is faster than two fighting over it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A plain .pt state_dict + sidecar JSON, two small .bin packs and an identity image folder."""
    from megaface.models import build_model

    root = tmp_path_factory.mktemp("evalcli")
    torch.manual_seed(0)
    model = build_model("mobilefacenet_tiny")
    ckpt = root / "backbone.pt"
    torch.save(model.state_dict(), ckpt)
    (root / "backbone.pt.json").write_text(json.dumps({"network": "mobilefacenet_tiny", "embedding_size": 128}))
    rng = np.random.default_rng(0)
    faces = [rng.integers(0, 255, (112, 112, 3), dtype=np.uint8) for _ in range(12)]
    bins = {}
    for name, pairs in (("lfw", 10), ("cfp_fp", 10)):
        images, issame = [], []
        for i in range(pairs):
            same = i % 2 == 0
            a, b = faces[i % 12], faces[i % 12 if same else (i + 5) % 12]
            noisy = np.clip(b.astype(int) + rng.integers(-20, 20, b.shape), 0, 255).astype(np.uint8)
            images += [cv2.imencode(".png", a)[1].tobytes(), cv2.imencode(".png", noisy)[1].tobytes()]
            issame.append(same)
        bins[name] = root / f"{name}.bin"
        with open(bins[name], "wb") as f:
            pickle.dump((images, issame), f)
    folder = root / "faces"
    for i in range(5):
        (folder / f"id{i % 2}").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"id{i % 2}" / f"{i}.jpg"), faces[i])
    return {"root": root, "ckpt": str(ckpt), "bins": bins, "folder": folder}


def _run_eval(state: DistState, argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main_eval(argv)
    return out.getvalue()


def test_eval_prints_seed_lines_and_writes_report(files, tmp_path):
    bins = [str(files["bins"]["lfw"]), str(files["bins"]["cfp_fp"])]
    report, roc = tmp_path / "r.json", tmp_path / "roc.png"
    argv = ["--checkpoint", files["ckpt"], "--bin", *bins, "--batch-size", "8", "--json", str(report),
            "--roc", str(roc)]
    text = _run_eval(DistState(), argv)
    lines = text.splitlines()
    assert lines[0] == "Validation on [lfw]:" and lines[1] == "Embedding shape: (20, 128)"
    assert re.fullmatch(r"XNorm: \d+\.\d{6}", lines[2])
    assert re.fullmatch(r"Accuracy-Flip: \d\.\d{5}\+-\d\.\d{5}", lines[3])
    assert lines[4:6] == ["Validation on [cfp_fp]:", "Embedding shape: (20, 128)"] and len(lines) == 8
    data = json.loads(report.read_text())
    assert data["network"] == "mobilefacenet_tiny" and set(data["packs"]) == {"lfw", "cfp_fp"}
    assert roc.stat().st_size > 0
    # the numbers are the protocol applied to the model's embeddings
    from megaface.checkpoint import load_backbone
    from megaface.eval.validation import read_bin

    model, _ = load_backbone(files["ckpt"])
    images, issame = read_bin(bins[0])
    emb, emb_flip = embed_images(model, images, DistState(), batch_size=8)
    expected = evaluate(emb, emb_flip, issame)
    assert data["packs"]["lfw"]["accuracy"] == expected["accuracy"]
    # two ranks print the same report from rank 0 only
    outputs = run_distributed(_run_eval, 2, argv[:4])
    assert outputs[1] == "" and outputs[0].splitlines()[:2] == lines[:2]
    assert outputs[0].splitlines()[3] == lines[3]  # same Accuracy-Flip line
    assert float(outputs[0].splitlines()[2][7:]) == pytest.approx(float(lines[2][7:]), abs=2e-6)


def test_eval_bad_inputs(files, tmp_path):
    lfw = str(files["bins"]["lfw"])
    with pytest.raises(ValueError, match="iresnet18"):
        cli.main_eval(["--checkpoint", files["ckpt"], "--network", "iresnet18", "--bin", lfw])
    with pytest.raises(ValueError, match="512"):
        cli.main_eval(["--checkpoint", files["ckpt"], "--embedding-size", "512", "--bin", lfw])
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        cli.main_eval(["--checkpoint", files["ckpt"], "--bin", str(tmp_path / "nope.bin")])
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        cli.main_eval(["--checkpoint", str(tmp_path / "missing.pt"), "--bin", lfw])
    odd = tmp_path / "odd.bin"
    with open(odd, "wb") as f:
        pickle.dump(([b"x"] * 5, [True, False]), f)
    with pytest.raises(ValueError, match="5 images"):
        cli.main_eval(["--checkpoint", files["ckpt"], "--bin", str(odd)])


def test_embed_bin_and_folder(files, tmp_path):
    out = tmp_path / "lfw.npy"
    cli.main_embed(["--checkpoint", files["ckpt"], "--bin", str(files["bins"]["lfw"]), "--output", str(out),
                    "--flip-fuse", "--batch-size", "16"])
    emb = np.load(out)
    assert emb.shape == (20, 128) and emb.dtype == np.float32
    assert np.load(tmp_path / "lfw.issame.npy").shape == (10,)
    assert (tmp_path / "lfw.paths.txt").read_text().splitlines()[3].endswith("lfw.bin:3")
    out2 = tmp_path / "faces.npy"
    cli.main_embed(["--checkpoint", files["ckpt"], "--images", str(files["folder"]), "--output", str(out2)])
    assert np.load(out2).shape == (5, 128)
    assert np.load(tmp_path / "faces.labels.npy").tolist() == [0, 0, 0, 1, 1]  # id0: 0,2,4; id1: 1,3
    with pytest.raises(FileNotFoundError, match="not a folder"):
        cli.main_embed(["--checkpoint", files["ckpt"], "--images", str(tmp_path / "none"), "--output", str(out2)])
