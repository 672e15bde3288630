"""Data: InsightFace RecordIO packs, .bin verification packs, OFRecord, image folders, synthetic identities, loader.

    recordio.py       MXNet RecordIO, byte for byte
    packs.py          training packs (train.rec + train.idx + property): `open_pack`, `PackWriter`
    sharded.py        K packs read as one dataset through a shards.json manifest (`ShardedPack`)
    image_list.py     what `pack rec` packs: an image folder or an im2rec .lst, as paths and labels
    pack_rec.py       `megaface pack rec`: parallel worker processes, deterministic bytes, shards
    pack_journal.py   the resume journal of a partial `pack rec`
    pack_workers.py   the worker processes of `pack rec`: records staged in files, appended by the kernel
    bin_pack.py       verification packs (lfw.bin, ...)
    ofrecord.py       OneFlow OFRecord directories: read, index, encode
    ofrecord_pack.py  `megaface pack ofrecord`
    decode.py         JPEG/PNG decoding and pixel normalisation
    align.py          5-point landmarks -> 112x112 ArcFace crops; `megaface align`
    synthetic.py      synthetic face-like identities, deterministic from a seed, and their one set of defaults
    synthetic_noise.py  label noise and low-quality faces for the synthetic set (pack synthetic options)
    datasets.py       training datasets by source (`build_dataset`)
    loader.py         TrainLoader: each rank's share of the global batch, exact resume
    augment.py        the input path on the device: uint8 batches, one ahead; augmentations and normalisation
    device_decode.py  data.decode=gpu: batches of JPEGs decoded on the device (nvJPEG through torchvision)
    cli.py            `megaface pack`
"""

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
