"""`megaface align`: a face warped by a known similarity comes back; crops equal InsightFace's own alignment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from megaface import cli
from megaface.data import open_pack
from megaface.data.align import ARCFACE_TEMPLATE, align_face, read_landmarks, similarity_matrix
from megaface.data.decode import decode_image, encode_jpeg
from megaface.data.synthetic import generate
from tests.conftest import run_under_pty
from tests.support.ijb_fixtures import loose_crop, random_similarity

INSIGHTFACE = os.environ.get("MEGAFACE_INSIGHTFACE")  # a checkout of deepinsight/insightface


def _inverse(similarity: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(similarity)


def test_known_similarity_is_recovered() -> None:
    rng = np.random.default_rng(0)
    faces = generate([0, 1, 2], [0, 1, 2])
    for face in faces:
        similarity = random_similarity(rng, 256)
        image, points = loose_crop(face, similarity, rng)
        estimate = similarity_matrix(points)
        np.testing.assert_allclose(estimate, _inverse(similarity), rtol=0, atol=1e-4)
        crop = align_face(image, points)
        inner = (slice(8, 104), slice(8, 104))  # two bilinear resamplings blur; the face itself must match
        err = np.abs(crop[inner].astype(int) - face[inner].astype(int)).mean()
        wrong = np.abs(align_face(image, points[[1, 0, 2, 4, 3]])[inner].astype(int) - face[inner].astype(int)).mean()
        assert err < 6.0 and wrong > 3 * err, (err, wrong)


def test_bad_landmarks_are_named() -> None:
    with pytest.raises(ValueError, match="5 finite"):
        similarity_matrix(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="coincident"):
        similarity_matrix(np.ones((5, 2)))


def _loose_set(root: Path, n: int = 4) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(1)
    (root / "img" / "a").mkdir(parents=True)
    names, images, points = [], [], []
    for i, face in enumerate(generate([0, 0, 1, 1][:n], list(range(n)))):
        image, pts = loose_crop(face, random_similarity(rng, 256), rng, landmark_noise=1.0)
        name = f"a/{i}.png"  # lossless, so the expected crop can be computed from the same pixels
        cv2.imwrite(str(root / "img" / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        names.append(name)
        images.append(image)
        points.append(pts)
    return names, images, points


def test_align_cli_folder_from_ijb_layout(tmp_path: Path) -> None:
    names, images, points = _loose_set(tmp_path)
    lines = [" ".join([n, *(f"{v:.4f}" for v in p.reshape(-1)), "0.9"]) for n, p in zip(names, points, strict=True)]
    (tmp_path / "lmk.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "aligned"
    assert cli.main(["align", "--images", str(tmp_path / "img"), "--landmarks", str(tmp_path / "lmk.txt"),
                     "--output", str(out), "--progress", "off"]) == 0
    records = read_landmarks(tmp_path / "lmk.txt")
    for name, image, record in zip(names, images, records, strict=True):
        crop = cv2.cvtColor(cv2.imread(str(out / name)), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(crop, align_face(image, record.landmarks))
    assert cli.main(["align", "--images", str(tmp_path / "img"), "--landmarks", str(tmp_path / "lmk.txt"),
                     "--output", str(out), "--output-format", "pack"]) == 2  # exists; and no labels anyway


def test_align_cli_pack_from_lst(tmp_path: Path) -> None:
    names, images, points = _loose_set(tmp_path)
    lines = [f"{i}\t{i // 2}\t{n}\t" + " ".join(f"{v:.4f}" for v in p.reshape(-1))
             for i, (n, p) in enumerate(zip(names, points, strict=True))]
    (tmp_path / "train.lst").write_text("\n".join(lines) + "\n")
    out = tmp_path / "pack"
    assert cli.main(["align", "--images", str(tmp_path / "img"), "--landmarks", str(tmp_path / "train.lst"),
                     "--output", str(out), "--output-format", "pack"]) == 0
    pack = open_pack(out)
    assert len(pack) == 4 and pack.labels().tolist() == [0, 0, 1, 1]
    record = read_landmarks(tmp_path / "train.lst")[3]
    expected = encode_jpeg(align_face(images[3], record.landmarks), quality=95)  # the pack stores JPEG q95
    assert pack[3][1] == expected and decode_image(pack[3][1]).shape == (112, 112, 3)


def test_align_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    names, _, points = _loose_set(tmp_path, n=2)
    lines = [" ".join([n, *(f"{v:.4f}" for v in p.reshape(-1)), "0.9"]) for n, p in zip(names, points, strict=True)]
    (tmp_path / "lmk.txt").write_text("\n".join(lines) + "\n")
    rc, out = run_under_pty([sys.executable, "-m", "megaface", "align", "--images", str(tmp_path / "img"),
                             "--landmarks", str(tmp_path / "lmk.txt"), "--output", str(tmp_path / "out")],
                            env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert rc == 0, out
    assert "\r" in out and "align:" in out and "2/2" in out, out  # tqdm's bar, redrawn in place


def test_align_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    names, _, points = _loose_set(tmp_path, n=2)
    (tmp_path / "short.txt").write_text(f"{names[0]} 1 2 3\n")
    args = ["align", "--images", str(tmp_path / "img"), "--output", str(tmp_path / "o")]
    assert cli.main([*args, "--landmarks", str(tmp_path / "short.txt")]) == 2
    assert "short.txt:1: expected 12 fields" in capsys.readouterr().err
    (tmp_path / "missing.txt").write_text("nope.jpg " + " ".join(["1"] * 10) + " 0.9\n")
    assert cli.main([*args, "--landmarks", str(tmp_path / "missing.txt")]) == 2
    assert "nope.jpg (line 1 of the landmark file) does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing half-written
    (tmp_path / "twice.txt").write_text(2 * (f"{names[0]} " + " ".join(["1"] * 10) + " 0.9\n"))
    assert cli.main([*args, "--landmarks", str(tmp_path / "twice.txt")]) == 2
    assert "line 2: image 'a/0.png' is listed twice" in capsys.readouterr().err
    (tmp_path / "bad.lst").write_text(f"0\tx\t{names[0]}\t" + " ".join(["1"] * 10) + "\n")
    assert cli.main([*args, "--landmarks", str(tmp_path / "bad.lst")]) == 2
    assert "bad.lst:1" in capsys.readouterr().err


@pytest.mark.skipif(not INSIGHTFACE, reason="set MEGAFACE_INSIGHTFACE to a checkout of deepinsight/insightface "
                                            "to compare with its recognition/arcface_mxnet/common/face_align.py")
@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")  # in face_align.py, not megaface
def test_crops_equal_insightface_norm_crop(monkeypatch: pytest.MonkeyPatch) -> None:
    common = Path(INSIGHTFACE) / "recognition" / "arcface_mxnet" / "common"
    monkeypatch.syspath_prepend(str(common))
    monkeypatch.delitem(sys.modules, "face_align", raising=False)
    import face_align  # insightface's own: skimage SimilarityTransform + cv2.warpAffine

    rng = np.random.default_rng(2)
    faces = generate([3, 4, 5, 6], [0, 1, 2, 3])
    assert np.allclose(face_align.arcface_src[0], ARCFACE_TEMPLATE)
    for face in faces:
        image, points = loose_crop(face, random_similarity(rng, 256), rng, landmark_noise=3.0)
        np.testing.assert_array_equal(align_face(image, points), face_align.norm_crop(image, points))
