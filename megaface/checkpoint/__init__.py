"""The checkpoint format: layout and discovery, backbone files, DeepSpeed partitions, FC7 shard files.

    layout.py       every file and folder name and pattern (tags, `latest`, meta.json, shards, rank
                    files, DeepSpeed's files, best backbones, the run lock), discovery
    backbone.py     backbone files (.pt / .safetensors + meta) and the backbone of a checkpoint
    zero_reader.py  fp32 weights from DeepSpeed's ZeRO 0-3 partition files, without DeepSpeed
    fc7_shards.py   the FC7 shard file format: one file per rank, its validator, merge, split and reshard
    integrity.py    per-file sha256 digests in meta.json, their verification (by every reader), the finite scan
    filetype.py     what a file is from its first bytes, for errors about a wrong file where weights belong
Imports only `megaface.head`, `megaface.models`, `megaface.distributed` and `megaface.fileio`.
"""

from megaface.checkpoint.backbone import (
                                          BACKBONE_FORMAT,
                                          checkpoint_backbone_state,
                                          load_backbone,
                                          read_backbone_file,
                                          resolve_network,
                                          save_backbone_file,
                                          strip_prefixes,
                                          strip_wrappers,
)
from megaface.checkpoint.layout import (
                                          CHECKPOINT_FORMAT,
                                          CHECKPOINTS_DIR,
                                          DS_DIR,
                                          FC7_DIR,
                                          LATEST,
                                          META_FILE,
                                          TAG_PREFIX,
                                          TRAINER_DIR,
                                          best_file_name,
                                          fc7_shard_file_name,
                                          find_checkpoint,
                                          load_torch_file,
                                          read_meta,
                                          resolve_checkpoint,
                                          tag_for,
                                          trainer_file_name,
)

__all__ = ["BACKBONE_FORMAT", "CHECKPOINT_FORMAT", "CHECKPOINTS_DIR", "DS_DIR", "FC7_DIR", "LATEST", "META_FILE",
           "TAG_PREFIX", "TRAINER_DIR", "best_file_name", "checkpoint_backbone_state", "fc7_shard_file_name", "find_checkpoint", "load_backbone",
           "load_torch_file", "read_backbone_file", "read_meta", "resolve_checkpoint", "resolve_network",
           "save_backbone_file", "strip_prefixes", "strip_wrappers", "tag_for", "trainer_file_name"]
