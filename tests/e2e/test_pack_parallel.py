"""`megaface pack rec` in worker processes: the same bytes as the single-process `PackWriter` for any worker
count and chunk size, im2rec .lst input, shards read as one dataset, and a killed pack resumed byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from megaface.cli import main as megaface_main
from megaface.data import build_dataset, encode_jpeg, open_pack
from megaface.data.datasets import FolderDataset
from megaface.data.image_list import from_folder, from_lst
from megaface.data.pack_journal import JOURNAL_NAME, partial_dir
from megaface.data.pack_rec import PackOptions, chunk_bounds, pack_images
from megaface.data.packs import PackWriter
from megaface.data.sharded import ShardedPack
from tests.support.image_folders import make_folder

ROOT = Path(__file__).resolve().parents[2]
FILES = ("train.rec", "train.idx", "property")


def reference_pack(images: Path, output: Path, size: int = 24) -> Path:
    """What megaface wrote before packing went parallel: PackWriter over the folder, one process."""
    ds = FolderDataset(images)
    with PackWriter(output, image_size=(size, size)) as writer:
        for i in range(len(ds)):
            writer.add(*ds[i])
    return output


def pack_bytes(directory: Path, names: tuple[str, ...] = FILES) -> dict[str, bytes]:
    found = {n: (directory / n).read_bytes() for n in names}
    assert all(found.values()), found.keys()
    return found


@pytest.mark.parametrize(("workers", "chunk_size"), [(1, 2000), (2, 3), (3, 1)])
def test_same_bytes_as_the_single_process_writer(tmp_path: Path, workers: int, chunk_size: int) -> None:
    images = make_folder(tmp_path / "faces")
    expected = pack_bytes(reference_pack(images, tmp_path / "ref"))
    summary = pack_images(from_folder(images), tmp_path / "out", workers=workers, chunk_size=chunk_size,
                          progress="off")
    assert pack_bytes(tmp_path / "out") == expected
    assert summary["images"] == 22 and summary["bytes"] == sum(len(b) for b in expected.values())
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_folder_listing_is_folder_datasets(tmp_path: Path) -> None:
    from megaface.data.image_list import PathTable

    images = make_folder(tmp_path / "faces")
    (images / "id001" / "notes.txt").write_text("not an image")
    (images / "id002" / "B.JPG").write_bytes((images / "id002" / "0.jpg").read_bytes())
    listed, reference = from_folder(images), FolderDataset(images)
    assert listed.paths[:] == [str(p) for p in reference.paths] and len(listed) == 23
    assert list(listed.labels) == list(reference.labels()) and listed.num_classes == reference.num_classes
    odd = PathTable(["a/\udcff.jpg", "b.jpg"])  # a file name that is not UTF-8 survives
    assert odd[0] == "a/\udcff.jpg" and odd[-1] == "b.jpg" and odd[0:2] == ["a/\udcff.jpg", "b.jpg"]
    table = PathTable(f"id{i % 3}/{'x' * (i % 5)}{i}.jpg" for i in range(20))
    for start, stop in [(0, 20), (0, 1), (5, 12), (19, 20), (7, 7)]:  # what a chunk carries to its worker
        assert list(table.section(start, stop)) == table[start:stop]
    assert list(odd.section(0, 1)) == ["a/\udcff.jpg"]


def test_reencoded_pack_holds_the_jpeg_of_each_decoded_image(tmp_path: Path) -> None:
    from megaface.data import decode_image

    images = make_folder(tmp_path / "faces", classes=3)
    pack_images(from_folder(images), tmp_path / "out", PackOptions(quality=90), workers=2, progress="off")
    pack = open_pack(tmp_path / "out")
    listed = from_folder(images)
    for i in range(len(pack)):
        original = decode_image(Path(listed.paths[i]).read_bytes())
        assert pack[i] == (int(listed.labels[i]), encode_jpeg(original, 90))


def write_im2rec_list(images: Path, lst: Path, seed: int = 100) -> None:
    """A shuffled list in im2rec's layout: index, label as %f, path relative to the root."""
    listed = from_folder(images)
    rows = [(i, float(label), os.path.relpath(p, images)) for i, (p, label) in enumerate(zip(listed.paths, listed.labels, strict=True))]
    order = np.random.default_rng(seed).permutation(len(rows))
    lst.write_text("".join("%d\t%f\t%s\n" % rows[i] for i in order))


def test_an_im2rec_list_packs_like_its_folder(tmp_path: Path) -> None:
    images = make_folder(tmp_path / "faces")
    write_im2rec_list(images, tmp_path / "train.lst")
    pack_images(from_lst(tmp_path / "train.lst", images), tmp_path / "from_lst", workers=2, chunk_size=4,
                progress="off")
    from_dir = pack_images(from_folder(images), tmp_path / "from_dir", workers=1, progress="off")
    # the same images and labels; the order inside a class is the list's (shuffled), so compare as sets
    a, b = open_pack(tmp_path / "from_lst"), open_pack(tmp_path / "from_dir")
    assert len(a) == len(b) == from_dir["images"] and a.num_classes == b.num_classes == 7
    assert sorted(a[i] for i in range(len(a))) == sorted(b[i] for i in range(len(b)))
    assert [a[i][0] for i in range(len(a))] == [b[i][0] for i in range(len(b))]  # grouped by class


@pytest.mark.skipif(not os.environ.get("MEGAFACE_IM2REC"),
                    reason="set MEGAFACE_IM2REC to mxnet/tools/im2rec.py of an mxnet install (and "
                           "MEGAFACE_IM2REC_PYTHON to that install's python) to check a list made by im2rec itself")
def test_a_list_made_by_mxnet_im2rec_packs_into_what_mxnet_reads(tmp_path: Path) -> None:
    images = make_folder(tmp_path / "faces")
    prefix = tmp_path / "train"
    subprocess.run([os.environ.get("MEGAFACE_IM2REC_PYTHON", sys.executable), os.environ["MEGAFACE_IM2REC"],
                    "--list", "--recursive", str(prefix), str(images)], check=True, capture_output=True, timeout=120)
    lst = prefix.with_suffix(".lst")
    assert lst.is_file() and "\t0.000000\t" in lst.read_text()
    pack_images(from_lst(lst, images), tmp_path / "from_lst", workers=2, progress="off")
    a, b = open_pack(tmp_path / "from_lst"), FolderDataset(images)
    assert sorted(a[i] for i in range(len(a))) == sorted(b[i] for i in range(len(b)))
    # and MXNet reads the pack as InsightFace's loader does: header record, then images by key
    read = textwrap.dedent("""
        import hashlib, json, sys
        import mxnet as mx
        rec = mx.recordio.MXIndexedRecordIO(sys.argv[1] + "/train.idx", sys.argv[1] + "/train.rec", "r")
        header, _ = mx.recordio.unpack(rec.read_idx(0))
        first, end = int(header.label[0]), int(header.label[1])
        out = []
        for key in range(1, first):
            h, image = mx.recordio.unpack(rec.read_idx(key))
            out.append([float(h.label), hashlib.sha1(image).hexdigest()])
        print(json.dumps({"identities": end - first, "images": out}))
    """)
    result = subprocess.run([os.environ.get("MEGAFACE_IM2REC_PYTHON", sys.executable), "-c", read,
                             str(tmp_path / "from_lst")], check=True, capture_output=True, text=True, timeout=120)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["identities"] == a.num_classes
    assert seen["images"] == [[float(label), hashlib.sha1(image).hexdigest()] for label, image in
                              (a[i] for i in range(len(a)))]


def test_bad_lists_are_refused_with_the_line(tmp_path: Path) -> None:
    images = make_folder(tmp_path / "faces", classes=2)
    bad = tmp_path / "bad.lst"
    for text, message in [("0\t0.000000\tid000/0.jpg\n1\tx\tid000/1.jpg\n", "bad.lst:2: label 'x' is not a number"),
                          ("0\t0.5\tid000/0.jpg\n", "label '0.5' is not a class number"),
                          ("0\t0\t1\tid000/0.jpg\n", "got 4 (a multi-value label"),
                          ("0\t1.000000\tid001/0.jpg\n", "have no image"),
                          ("", "holds no images")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            from_lst(bad, images)
    bad.write_text("0\t0\tid000/missing.jpg\n")
    with pytest.raises(FileNotFoundError, match="missing.jpg: cannot read the image"):
        pack_images(from_lst(bad, images), tmp_path / "out", workers=1, progress="off")


def test_shards_read_as_one_dataset(tmp_path: Path) -> None:
    images = make_folder(tmp_path / "faces")
    pack_images(from_folder(images), tmp_path / "single", workers=1, progress="off")
    summary = pack_images(from_folder(images), tmp_path / "sharded", PackOptions(shards=3), workers=2,
                          chunk_size=5, progress="off")
    single = open_pack(tmp_path / "single")
    for path in (tmp_path / "sharded", tmp_path / "sharded" / "shards.json"):
        sharded = build_dataset("recordio", path)
        assert isinstance(sharded, ShardedPack) and len(sharded) == len(single) == summary["images"]
        assert sharded.num_classes == 7 and sharded.image_size == (24, 24)
        assert [sharded[i] for i in range(len(sharded))] == [single[i] for i in range(len(single))]
        assert list(sharded.labels()) == list(single.labels())
    # every shard is a complete pack of its own: whole classes, labels from 0
    shards = [open_pack(tmp_path / "sharded" / f"shard-0000{k}") for k in range(3)]
    # image counts 3,1,4,1,5,2,6: class ranges cut where the running count passes 1/3 and 2/3 of 22
    assert [s.num_classes for s in shards] == [3, 3, 1] and [len(s) for s in shards] == [8, 8, 6]
    assert all(s.has_header for s in shards)


def test_the_train_loader_reads_shards_like_the_single_pack(tmp_path: Path) -> None:
    from megaface.data import TrainLoader

    images = make_folder(tmp_path / "faces")
    pack_images(from_folder(images), tmp_path / "single", workers=1, progress="off")
    pack_images(from_folder(images), tmp_path / "sharded", PackOptions(shards=3), workers=1, progress="off")
    single, sharded = open_pack(tmp_path / "single"), build_dataset("recordio", tmp_path / "sharded" / "shards.json")
    batches = [list(TrainLoader(ds, 4, seed=3, workers=0, flip=False)) for ds in (single, sharded)]
    assert len(batches[0]) == 5 and all(torch_equal(a, b) for a, b in zip(*batches, strict=True))


def torch_equal(a: tuple, b: tuple) -> bool:
    return all(bool((x == y).all()) for x, y in zip(a, b, strict=True))


def test_a_sharded_pack_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    images = make_folder(tmp_path / "faces")
    pack_images(from_folder(images), tmp_path / "whole", PackOptions(shards=3), workers=1, progress="off")
    names = ["shards.json"] + [f"shard-0000{k}/{n}" for k in range(3) for n in FILES]
    expected = pack_bytes(tmp_path / "whole", tuple(names))
    bad = images / "id004" / "4.jpg"  # image 13 of 22: in the second shard
    good = bad.read_bytes()
    bad.write_bytes(b"broken")
    with pytest.raises(ValueError, match="images packed before it are kept"):
        pack_images(from_folder(images), tmp_path / "out", PackOptions(shards=3), workers=1, chunk_size=2,
                    progress="off")
    bad.write_bytes(good)
    summary = pack_images(from_folder(images), tmp_path / "out", PackOptions(shards=3), workers=2, resume=True,
                          progress="off")
    assert summary["resumed_from"] == 12 and pack_bytes(tmp_path / "out", tuple(names)) == expected


def test_shards_and_workers_are_checked(tmp_path: Path) -> None:
    images = make_folder(tmp_path / "faces", classes=2)
    with pytest.raises(ValueError, match="--shards 3: must be between 1 and the 2 classes"):
        pack_images(from_folder(images), tmp_path / "o", PackOptions(shards=3), progress="off")
    with pytest.raises(ValueError, match="--workers 0: must be >= 1"):
        pack_images(from_folder(images), tmp_path / "o", workers=0, progress="off")


def test_a_failed_pack_keeps_its_complete_chunks_and_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    images = make_folder(tmp_path / "faces")
    expected = pack_bytes(reference_pack(images, tmp_path / "ref"))
    late = images / "id006" / "5.jpg"  # the last image: in the last chunk
    good = late.read_bytes()
    late.write_bytes(good[:50])
    # 22 images on 2 workers, --chunk-size 4: chunks 4, 4, 4, 4, 4, 2 (chunk_bounds), so 20 images are complete
    assert [b - a for a, b in chunk_bounds(0, 22, 4, 2)] == [4, 4, 4, 4, 4, 2]
    with pytest.raises(ValueError, match=r"5.jpg: .*the 20 images packed before it are kept .* --resume"):
        pack_images(from_folder(images), tmp_path / "out", workers=2, chunk_size=4, progress="off")
    partial = partial_dir(tmp_path / "out")
    assert not (tmp_path / "out").exists() and (partial / JOURNAL_NAME).is_file()
    late.write_bytes(good)
    with pytest.raises(FileExistsError, match="pass --resume to continue it or --force"):
        pack_images(from_folder(images), tmp_path / "out", workers=2, chunk_size=4, progress="off")
    # a half-written chunk (a kill between the data and the journal line) is cut off on resume
    with open(partial / "train.rec", "ab") as f:
        f.write(b"\x0a\x23\xd7\xce half a record")
    with open(partial / "train.idx", "ab") as f:
        f.write(b"22\t99")
    summary = pack_images(from_folder(images), tmp_path / "out", workers=1, chunk_size=7, resume=True,
                          progress="off")
    assert summary["resumed_from"] == 20 and pack_bytes(tmp_path / "out") == expected and not partial.exists()


def test_resume_refuses_another_input(tmp_path: Path) -> None:
    images = make_folder(tmp_path / "faces")
    last = images / "id006" / "5.jpg"
    last.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError):
        pack_images(from_folder(images), tmp_path / "out", workers=1, chunk_size=4, progress="off")
    last.unlink()
    with pytest.raises(ValueError, match="packed from another image list or with other options"):
        pack_images(from_folder(images), tmp_path / "out", workers=1, chunk_size=4, resume=True, progress="off")
    pack_images(from_folder(images), tmp_path / "out", workers=1, overwrite=True, progress="off")  # --force
    assert len(open_pack(tmp_path / "out")) == 21


def test_force_replaces_the_whole_output(tmp_path: Path) -> None:
    images = make_folder(tmp_path / "faces", classes=3)
    pack_images(from_folder(images), tmp_path / "out", PackOptions(shards=2), workers=1, progress="off")
    with pytest.raises(FileExistsError, match="exists and is not empty; pass --force"):
        pack_images(from_folder(images), tmp_path / "out", workers=1, progress="off")
    pack_images(from_folder(images), tmp_path / "out", workers=1, overwrite=True, progress="off")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(FILES)  # no shard left from before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces", "out"]


def _pack_cmd(images: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megaface", "pack", "rec", "--images", str(images), "--output", str(output),
            *extra]


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_killed_pack_resumes_to_the_bytes_of_an_uninterrupted_one(tmp_path: Path, sig: int) -> None:
    """SIGKILL to the parent (the OOM killer); SIGTERM and SIGINT to the whole process group, as a batch
    system's stop and a terminal's Ctrl-C reach the parent and its workers."""
    images = make_folder(tmp_path / "faces", classes=300, per_class=(9, 10, 11), size=16)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    expected = pack_bytes(reference_pack(images, tmp_path / "whole", size=16))
    out = tmp_path / "killed"
    journal = partial_dir(out) / JOURNAL_NAME
    proc = subprocess.Popen(_pack_cmd(images, out, "--workers", "2", "--chunk-size", "5"), env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.is_file() and journal.read_text().count("\n") >= 6:  # header + 5 chunks complete
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the pack ended before it could be killed"
    if sig == signal.SIGKILL:
        os.kill(proc.pid, sig)
    else:
        os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=30)
    assert not out.exists() and journal.is_file()
    if sig != signal.SIGKILL:
        assert proc.returncode == 128 + sig and err.strip().splitlines()[-1] == (
            f"megaface pack: stopped by {signal.Signals(sig).name}; the chunks packed before are kept: rerun "
            "with --resume to continue"), err[-2000:]
        assert "Traceback" not in err, err[-3000:]
    for _ in range(100):  # the workers die with their parent (PR_SET_PDEATHSIG)
        if not _group_alive(proc.pid):
            break
        time.sleep(0.05)
    assert not _group_alive(proc.pid)
    done = int(journal.read_text().strip().split("\n")[-1].split('"done": ')[1].split(",")[0])
    assert 0 < done < 3000
    # what `megaface pack rec ... --resume` runs (in this process: a second interpreter start costs seconds)
    summary = pack_images(from_folder(images), out, workers=2, resume=True, progress="off")
    assert summary["resumed_from"] == done
    assert pack_bytes(out) == expected and not partial_dir(out).exists()


def test_pack_rec_cli_list_shards_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = make_folder(tmp_path / "faces")
    write_im2rec_list(images, images / "train.lst")
    assert megaface_main(["pack", "rec", "--list", str(images / "train.lst"), "--output", str(tmp_path / "o"),
                          "--shards", "2", "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert "images=22 classes=7" in captured.out and "shards=2 workers=2" in captured.out
    assert "pack: 22/22 images" in captured.err  # the final progress line (stderr is not a terminal here)
    assert len(build_dataset("recordio", tmp_path / "o")) == 22
    assert megaface_main(["pack", "rec", "--output", str(tmp_path / "p")]) == 2
    assert "--images ROOT" in capsys.readouterr().err
