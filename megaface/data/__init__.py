"""Data: InsightFace RecordIO packs, .bin verification packs, image folders, synthetic identities, loader."""

from megaface.data.bin_pack import load_bin, save_bin
from megaface.data.datasets import FolderDataset, build_dataset
from megaface.data.decode import CorruptImageError, decode_image, encode_jpeg, normalize_batch
from megaface.data.loader import DataError, TrainLoader
from megaface.data.packs import PackWriter, RecordPack, open_pack, read_property
from megaface.data.synthetic import SyntheticDataset, ensure_synthetic

__all__ = [
    "CorruptImageError", "DataError", "FolderDataset", "PackWriter", "RecordPack", "SyntheticDataset", "TrainLoader",
    "build_dataset", "decode_image", "encode_jpeg", "ensure_synthetic", "load_bin", "normalize_batch",
    "open_pack", "read_property", "save_bin",
]
