"""`megaface pack`: round trips (what pack writes, the readers read back identically) and failure hygiene."""

from __future__ import annotations

import numpy as np
import pytest

from megaface.cli import main as megaface_main
from megaface.data import decode_image, encode_jpeg, load_bin, open_pack


def _folder(root, counts=(("id_b", 2), ("id_a", 3), ("id_c", 1)), size=112):
    rng = np.random.default_rng(2)
    files = {}
    for name, count in counts:
        (root / name).mkdir(parents=True)
        for j in range(count):
            data = encode_jpeg(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), quality=80 + j)
            (root / name / f"img{j}.jpg").write_bytes(data)
            files[(name, j)] = data
    return files


def _no_leftovers(parent):
    return not [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_pack_rec_round_trip(tmp_path, capsys):
    files = _folder(tmp_path / "faces")
    assert megaface_main(["pack", "rec", "--images", str(tmp_path / "faces"), "--output", str(tmp_path / "pack")]) == 0
    assert "images=6 classes=3" in capsys.readouterr().out
    pack = open_pack(tmp_path / "pack")
    assert pack.has_header and len(pack) == 6 and pack.num_classes == 3 and pack.image_size == (112, 112)
    expected = [(c, files[(name, j)]) for c, (name, n) in enumerate([("id_a", 3), ("id_b", 2), ("id_c", 1)])
                for j in range(n)]
    assert [pack[i] for i in range(len(pack))] == expected  # every byte, every label
    assert _no_leftovers(tmp_path)
    # refuses to overwrite without --force
    assert megaface_main(["pack", "rec", "--images", str(tmp_path / "faces"), "--output", str(tmp_path / "pack")]) == 2
    assert "exists" in capsys.readouterr().err
    assert megaface_main(["pack", "rec", "--images", str(tmp_path / "faces"), "--output", str(tmp_path / "pack"), "--force"]) == 0


def test_pack_rec_via_top_level_cli(tmp_path):
    _folder(tmp_path / "faces", counts=(("x", 1), ("y", 1)))
    assert megaface_main(["pack", "rec", "--images", str(tmp_path / "faces"), "--output", str(tmp_path / "o")]) == 0
    assert open_pack(tmp_path / "o").num_classes == 2


def test_pack_rec_corrupt_image_leaves_nothing(tmp_path, capsys):
    _folder(tmp_path / "faces")
    bad = tmp_path / "faces" / "id_b" / "img1.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    assert megaface_main(["pack", "rec", "--images", str(tmp_path / "faces"), "--output", str(tmp_path / "pack")]) == 2
    assert "id_b/img1.jpg" in capsys.readouterr().err
    assert not (tmp_path / "pack").exists() and _no_leftovers(tmp_path)


def test_pack_rec_empty_identity_and_mixed_sizes(tmp_path, capsys):
    _folder(tmp_path / "faces")
    (tmp_path / "faces" / "id_empty").mkdir()
    assert megaface_main(["pack", "rec", "--images", str(tmp_path / "faces"), "--output", str(tmp_path / "pack")]) == 2
    assert "id_empty: identity folder holds no images" in capsys.readouterr().err
    assert not (tmp_path / "pack").exists()
    _folder(tmp_path / "mixed", counts=(("a", 1),))
    _folder(tmp_path / "mixed2", counts=(("b", 1),), size=96)
    (tmp_path / "mixed2" / "b").rename(tmp_path / "mixed" / "b")
    assert megaface_main(["pack", "rec", "--images", str(tmp_path / "mixed"), "--output", str(tmp_path / "pack")]) == 2
    assert "96x96" in capsys.readouterr().err and not (tmp_path / "pack").exists() and _no_leftovers(tmp_path)


def test_pack_bin_round_trip(tmp_path, capsys):
    files = _folder(tmp_path / "faces")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(
        "# path_a path_b same\n"
        "id_a/img0.jpg id_a/img1.jpg 1\n"
        "\n"
        f"id_a/img2.jpg\t{tmp_path / 'faces' / 'id_b' / 'img0.jpg'}\t0\n"
        "id_b/img0.jpg id_b/img1.jpg same\n"
    )
    out = tmp_path / "val" / "mine.bin"
    assert megaface_main(["pack", "bin", "--pairs", str(pairs), "--images", str(tmp_path / "faces"), "--output", str(out)]) == 0
    images, issame = load_bin(out)
    order = [("id_a", 0), ("id_a", 1), ("id_a", 2), ("id_b", 0), ("id_b", 0), ("id_b", 1)]
    assert images == [files[k] for k in order] and issame == [True, False, True]
    assert decode_image(images[0]).shape == (112, 112, 3)


def test_pack_bin_bad_pairs(tmp_path, capsys):
    _folder(tmp_path / "faces")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("id_a/img0.jpg id_a/img1.jpg 1\nid_a/img0.jpg maybe\n")
    args = ["bin", "--pairs", str(pairs), "--images", str(tmp_path / "faces"), "--output", str(tmp_path / "v.bin")]
    assert megaface_main(["pack", *args]) == 2
    assert "pairs.txt:2: expected 'path_a path_b 1|0'" in capsys.readouterr().err
    pairs.write_text("id_a/img0.jpg id_z/img9.jpg 0\n")
    assert megaface_main(["pack", *args]) == 2
    assert "id_z/img9.jpg not found" in capsys.readouterr().err
    assert not (tmp_path / "v.bin").exists() and _no_leftovers(tmp_path)


def test_pack_synthetic(tmp_path, capsys):
    out = tmp_path / "syn"
    args = ["synthetic", "--output", str(out), "--identities", "4", "--images-per-identity", "3",
            "--val-pairs", "10", "--seed", "7"]
    assert megaface_main(["pack", *args]) == 0
    pack = open_pack(out)
    assert len(pack) == 12 and pack.num_classes == 4 and pack.labels().tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    images, issame = load_bin(out / "val.bin")
    assert len(images) == 20 and sum(issame) == 5
    assert decode_image(pack[0][1]).shape == (112, 112, 3)
    assert megaface_main(["pack", *args]) == 2 and "exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        megaface_main(["pack", "synthetic"])  # --output is required
