"""IJB-B / IJB-C from the released loose crops: align, embed image + flip, as arcface_torch's eval_ijbc.py.

Released layout (`ijb_dir`):

    loose_crop/<image name>                 the face crops as released (loose, unaligned)
    meta/<prefix>_face_tid_mid.txt          image -> template id, media id
    meta/<prefix>_template_pair_label.txt   template pairs and labels
    meta/<prefix>_name_5pts_score.txt       image -> 5 landmarks in the loose crop, detector score

Each loose crop is aligned from its 5 points to the 112x112 ArcFace template (`megaface.data.align`, the same
estimate and warp as eval_ijbc.py), embedded with its horizontal flip, and the two embeddings are added
(eval_ijbc.py's F2 mode). Scoring (detector-score weighting, media and template pooling, TAR@FAR) is
`megaface.eval.ijb` with pooling 'arcface_torch'.

| step                       | shape                       |
|----------------------------|-----------------------------|
| face list                  | N images                    |
| aligned crops (lazy)       | uint8 [112, 112, 3] each    |
| emb, emb_flip              | float32 [N, D] each         |
| features = emb + emb_flip  | float32 [N, D]              |
| detector scores            | float32 [N]                 |
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import numpy as np
import torch

from megaface.data.align import AlignedFaces, FaceRecord
from megaface.distributed import DistState
from megaface.eval.embed import embed_images, shard_range
from megaface.eval.ijb import protocol_paths, read_face_list, read_media_list
from megaface.utils.progress import Progress
from megaface.vocab import ProgressMode


def ijb_layout(ijb_dir: str | os.PathLike, target: str) -> tuple[Path, Path]:
    """-> (loose_crop folder, meta folder) of a released IJB folder, each checked."""
    root = Path(ijb_dir)
    images, meta = root / "loose_crop", root / "meta"
    if not images.is_dir() or not meta.is_dir():
        raise FileNotFoundError(f"--ijb-dir {root} must hold loose_crop/ (the released face crops) and meta/ "
                                f"(the {target.lower()}_*.txt protocol files); give the {target} folder")
    protocol_paths(meta, target)
    return images, meta


def _faces_to_align(meta: Path, target: str) -> list[FaceRecord]:
    """Landmarks and detector scores of every face-list image, in face-list order."""
    names, _, _ = read_media_list(protocol_paths(meta, target)[0])
    return read_face_list(meta, target, names, "it gives each loose crop's 5 landmarks and detector score "
                          "('<image> x1 y1 ... x5 y5 <score>' lines), needed to align the faces")


def embed_ijb(model: torch.nn.Module, ijb_dir: str | os.PathLike, target: str, state: DistState,
              batch_size: int, normalize: str, progress: ProgressMode = "auto"
              ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """-> features [N, D] (image + flip embeddings), detector scores [N], image names; on every rank."""
    images, meta = ijb_layout(ijb_dir, target)
    records = _faces_to_align(meta, target)
    start, stop = shard_range(len(records), state.world_size, state.rank)
    # Each rank aligns only its share; the main rank shows its own share's progress.
    with Progress(f"eval-ijb {target.upper()}", stop - start, "faces", enabled=state.is_main,
                  mode=progress) as bar:
        faces = AlignedFaces(images, records, bar)
        emb, emb_flip = embed_images(model, faces, state, batch_size, normalize, flip=True)
    scores = np.array([r.score for r in records], np.float32)
    return emb + cast(np.ndarray, emb_flip), scores, [r.name for r in records]  # flip=True: never None
