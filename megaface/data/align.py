"""Face alignment from 5 landmarks to the 112x112 ArcFace template, and `megaface align`.

A similarity transform (rotation, uniform scale, translation) maps the 5 detected points (left eye, right
eye, nose tip, left and right mouth corners, in image pixels) onto `ARCFACE_TEMPLATE`, least squares;
OpenCV's `warpAffine` (bilinear, black border) resamples the crop.

The estimate comes from scikit-image's `SimilarityTransform` (Umeyama's closed form), the library that
InsightFace's alignment and arcface_torch's eval_ijbc.py call, so crops equal theirs bit for bit. OpenCV's
`estimateAffinePartial2D` was measured as the alternative: its iterative refinement stops about 1e-5
(relative) short of the least-squares optimum, and ~0.1% of the crop pixels then differ by one level.

Landmark files (`read_landmarks` picks the layout by suffix):

| layout                     | line                                                      |
|----------------------------|-----------------------------------------------------------|
| IJB meta (`*.txt`)         | `<image name> x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 <detector score>` |
| im2rec list (`*.lst`)      | `<index>\\t<label>\\t<path>\\t` then x1 y1 ... x5 y5 (tabs or spaces) |

Image names and paths are relative to the image root. A pack needs identity labels, so only a .lst
becomes a pack (labels grouped 0, 1, 2, ... as `PackWriter` requires); any file becomes a folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from megaface.data.decode import CorruptImageError, decode_image, encode_jpeg
from megaface.fileio import make_temp_dir, move_into_place
from megaface.utils.progress import Progress
from megaface.vocab import ALIGN_OUTPUTS, PROGRESS_MODES

ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)
"""Where the 5 points land in a 112x112 ArcFace crop (x, y in pixels), the InsightFace convention."""
CROP_SIZE = 112


@dataclass(frozen=True)
class FaceRecord:
    """One face: image path relative to the root, 5 points [5, 2] (x, y), detector score, label (-1: none)."""

    name: str
    landmarks: np.ndarray
    score: float = 1.0
    label: int = -1


def similarity_matrix(landmarks: np.ndarray, template: np.ndarray = ARCFACE_TEMPLATE) -> np.ndarray:
    """[5, 2] points in the image -> the [2, 3] least-squares similarity mapping them onto `template`."""
    try:
        from skimage.transform import SimilarityTransform
    except ImportError:
        raise ValueError("alignment needs scikit-image: pip install 'megaface[align]' (or scikit-image)") from None
    points = np.asarray(landmarks, np.float32)
    if points.shape != template.shape or not np.isfinite(points).all():
        raise ValueError(f"landmarks must be {template.shape[0]} finite (x, y) points, got {points.shape}")
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        transform = SimilarityTransform.from_estimate(points, template)
        ok = bool(transform)
    else:  # older releases: the same estimate, in place
        transform = SimilarityTransform()
        ok = transform.estimate(points, template)
    if not ok:
        raise ValueError(f"no similarity maps landmarks {points.tolist()} onto the template (coincident points?)")
    return np.asarray(transform.params[:2], np.float64)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """uint8 [H, W, C] image + its 5 points -> uint8 [size, size, C] aligned crop (channel order kept)."""
    if size != CROP_SIZE:
        raise ValueError(f"crop size {size}: the ArcFace template is defined for {CROP_SIZE}x{CROP_SIZE}")
    return cv2.warpAffine(image, similarity_matrix(landmarks), (size, size), borderValue=0.0)


def _numbers(fields: list[str], where: str) -> list[float]:
    try:
        return [float(x) for x in fields]
    except ValueError:
        raise ValueError(f"{where}: landmark/score fields must be numbers, got {fields}") from None


def read_ijb_landmarks(path: str | os.PathLike) -> list[FaceRecord]:
    """IJB meta layout: `name x1 y1 ... x5 y5 score` per line."""
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 12:
                raise ValueError(f"{path}:{n}: expected 12 fields 'name x1 y1 ... x5 y5 score', got {len(parts)}")
            values = _numbers(parts[1:], f"{path}:{n}")
            records.append(FaceRecord(parts[0], np.array(values[:10], np.float32).reshape(5, 2), values[10]))
    if not records:
        raise ValueError(f"{path} holds no landmark lines ('name x1 y1 ... x5 y5 score')")
    return records


def read_lst_landmarks(path: str | os.PathLike) -> list[FaceRecord]:
    """im2rec list with landmarks: `index<TAB>label<TAB>path<TAB>x1 y1 ... x5 y5` per line."""
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            points = " ".join(fields[3:]).split()
            if len(fields) < 4 or len(points) != 10:
                raise ValueError(f"{path}:{n}: expected 'index<TAB>label<TAB>path<TAB>x1 y1 ... x5 y5' "
                                 f"(10 landmark values), got {line.strip()!r}")
            label = _numbers([fields[1]], f"{path}:{n}")[0]
            if label != int(label) or label < 0:
                raise ValueError(f"{path}:{n}: label {fields[1]!r} must be a whole number >= 0")
            values = _numbers(points, f"{path}:{n}")
            records.append(FaceRecord(fields[2], np.array(values, np.float32).reshape(5, 2), 1.0, int(label)))
    if not records:
        raise ValueError(f"{path} holds no lines ('index<TAB>label<TAB>path<TAB>x1 y1 ... x5 y5')")
    return records


def read_landmarks(path: str | os.PathLike) -> list[FaceRecord]:
    """Landmark file by suffix: `.lst` = im2rec list with labels, anything else = IJB meta layout."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"landmark file {path} does not exist")
    return read_lst_landmarks(path) if str(path).endswith(".lst") else read_ijb_landmarks(path)


class AlignedFaces(Sequence[np.ndarray]):
    """The aligned RGB crops of `records` under `root`, decoded and warped on access (nothing is held)."""

    def __init__(self, root: str | os.PathLike, records: list[FaceRecord], progress: Progress | None = None):
        self.root, self.records, self.progress = Path(root), records, progress
        self._furthest = -1  # progress counts a face once, though embedding reads the first one twice

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        record = self.records[i]
        path = self.root / record.name
        try:
            image = decode_image(path.read_bytes())
        except FileNotFoundError:
            raise FileNotFoundError(f"image {path} (line {i + 1} of the landmark file) does not exist; "
                                    "--images must be the folder the names are relative to") from None
        except CorruptImageError as err:
            raise ValueError(f"image {path}: {err}; replace the file or drop its line") from None
        try:
            crop = align_face(image, record.landmarks)
        except ValueError as err:
            raise ValueError(f"{path} (line {i + 1} of the landmark file): {err}") from None
        if self.progress is not None and i > self._furthest:
            self._furthest = i
            self.progress.update()
        return crop


def _encode(crop_rgb: np.ndarray, name: str) -> bytes:
    if name.lower().endswith((".jpg", ".jpeg")):
        return encode_jpeg(crop_rgb, quality=95)
    ok, buf = cv2.imencode(Path(name).suffix or ".png", cv2.cvtColor(crop_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"cannot encode {name!r}: use a .jpg or .png name")
    return buf.tobytes()


def write_folder(faces: AlignedFaces, output: Path, overwrite: bool) -> None:
    """Each crop at `output/<name>` (same relative path; JPEG q95 for .jpg names); appears when complete."""
    seen: set[str] = set()
    for n, record in enumerate(faces.records, 1):
        parts = Path(record.name).parts
        if Path(record.name).is_absolute() or ".." in parts:
            raise ValueError(f"line {n}: image name {record.name!r} leaves the output folder; names must be "
                             "relative paths below --images")
        if record.name in seen:
            raise ValueError(f"line {n}: image {record.name!r} is listed twice; one crop per file name")
        seen.add(record.name)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(output)
    try:
        for i, record in enumerate(faces.records):
            target = tmp / record.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_encode(faces[i], record.name))
        if overwrite and output.exists():
            shutil.rmtree(output)
        move_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_pack(faces: AlignedFaces, output: Path, overwrite: bool) -> None:
    """A RecordIO training pack (train.rec/.idx/property) of JPEG q95 crops, labels from the .lst."""
    from megaface.data.packs import PackWriter

    if any(r.label < 0 for r in faces.records):
        raise ValueError("a pack needs identity labels: give an im2rec .lst with landmarks, or --output-format "
                         "folder for an IJB-layout landmark file")
    with PackWriter(output, (CROP_SIZE, CROP_SIZE), overwrite=overwrite) as writer:
        for i, record in enumerate(faces.records):
            writer.add(record.label, encode_jpeg(faces[i], quality=95))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megaface align", description="5-point landmarks -> 112x112 ArcFace crops")
    parser.add_argument("--images", required=True, help="folder the landmark file's image names are relative to")
    parser.add_argument("--landmarks", required=True, help="IJB meta layout 'name x1 y1 ... x5 y5 score' "
                                                           "or an im2rec .lst with 10 landmark values")
    parser.add_argument("--output", required=True, help="output folder (crops, or train.rec/.idx/property)")
    parser.add_argument("--output-format", choices=ALIGN_OUTPUTS, default="folder")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument("--progress", choices=PROGRESS_MODES, default="auto")
    args = parser.parse_args(argv)
    records = read_landmarks(args.landmarks)
    if not Path(args.images).is_dir():
        raise FileNotFoundError(f"--images {args.images} is not a folder")
    output = Path(args.output)
    if output.exists() and not args.force and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"--output {output} exists and is not empty; pass --force to replace it")
    with Progress("align", len(records), "faces", mode=args.progress) as progress:
        faces = AlignedFaces(args.images, records, progress)
        (write_pack if args.output_format == "pack" else write_folder)(faces, output, args.force)
    print(f"wrote {len(records)} aligned {CROP_SIZE}x{CROP_SIZE} crops to {output} ({args.output_format})", flush=True)
    return 0
