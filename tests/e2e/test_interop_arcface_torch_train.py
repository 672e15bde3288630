"""`megaface train --resume` continues arcface_torch's own run, through the command and its data path.

The fixture (tests/fixtures/interop/arcface_torch/train_w2, written by arcface_torch's code; see
tests/support/arcface_torch_fixtures.py) holds a 2-rank arcface_torch resume checkpoint at global_step 3, the
batch of its next step (next_batch.pt: per-rank uint8 images and labels) and the losses arcface_torch reported
for that step and the one after on the same batch (reference.json).

Here the checkpoint is imported with `megaface convert import-arcface-torch`, that batch is written into a
RecordIO pack (PNG records: lossless, so the loader decodes arcface_torch's exact pixels), and
`megaface train --resume <imported tag dir>` runs under torchrun on 2 ranks as a user would start it. The
pack is laid out so that the loader's own epoch order (shuffle seeded by data.seed, flip off) hands rank r
exactly arcface_torch's rank-r images, in order, for the first two steps; the test checks that with the
loader itself before it trusts it. The logged losses of the first two steps (`train: iter 3` and `iter 4`: the log counts steps from 0, so the
step after arcface_torch's global_step 3 is iteration 3) are compared with arcface_torch's. The run goes on to
the schedule's end (train.max_steps = arcface_torch's total_iters, 20) rather than stopping early, since a
shorter max_steps would change the polynomial lr of the second step; about a minute on 2 CPUs: slow-marked.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from megaface.cli import main as megaface_main
from megaface.data import build_dataset
from megaface.data.loader import TrainLoader, epoch_permutation
from megaface.data.recordio import RecordWriter, pack_payload
from tests.support.job_utils import torchrun

FIXTURE = Path(__file__).parents[1] / "fixtures" / "interop" / "arcface_torch" / "train_w2"
SEED = 7  # data.seed of the resumed run: any value, the pack is laid out for it


def write_batch_pack(directory: Path, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     seed: int, repeats: int) -> None:
    """A header-less InsightFace RecordIO pack (every key an image; `property` gives the class count) whose
    records the loader's epoch-0 order yields as `images` [W, B, 3, H, W] / `labels` [W, B], `repeats` times:
    global batch g, rank r = images[r]. The images are stored as PNG (lossless)."""
    world, batch = labels.shape
    flat_images, flat_labels = images.flatten(0, 1), labels.flatten()
    count = world * batch * repeats
    perm = epoch_permutation(count, seed, 0)  # position p of epoch 0 reads dataset index perm[p]
    record_of = np.empty(count, dtype=np.int64)
    record_of[perm] = np.arange(count) % (world * batch)
    directory.mkdir(parents=True)
    with RecordWriter(directory / "train.rec", directory / "train.idx") as writer:
        for key, sample in enumerate(record_of.tolist()):
            rgb = flat_images[sample].permute(1, 2, 0).numpy()
            ok, png = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
            assert ok
            writer.write(key, pack_payload(int(flat_labels[sample]), png.tobytes(), id=key))
    (directory / "property").write_text(f"{num_classes},{images.shape[-2]},{images.shape[-1]}\n")


def loader_batches(pack: Path, world: int, batch: int, steps: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """What megaface's TrainLoader hands each rank for the first `steps` steps (uint8 pixels, as decoded)."""
    out = []
    for rank in range(world):
        loader = TrainLoader(build_dataset("recordio", pack), batch, rank, world, seed=SEED, workers=0, flip=False,
                             normalize="none")
        batches = iter(loader)
        out.append([next(batches) for _ in range(steps)])
    return out


@pytest.mark.slow
def test_train_resume_continues_arcface_torchs_run(tmp_path: Path) -> None:
    reference = json.loads((FIXTURE / "reference.json").read_text())
    saved = torch.load(FIXTURE / "next_batch.pt", weights_only=True)
    images, labels = saved["images_uint8"], saved["labels"]
    world, batch = labels.shape
    assert world == reference["config"]["world_size"] == 2

    tag = tmp_path / "imported" / "step_00000003"
    assert megaface_main(["convert", "import-arcface-torch", str(FIXTURE), "-o", str(tag), "--network",
                          "mobilefacenet", "--world-size", str(world)]) == 0
    meta = json.loads((tag / "meta.json").read_text())

    pack = tmp_path / "pack"
    write_batch_pack(pack, images, labels, meta["num_classes"], SEED, repeats=2)
    for rank, batches in enumerate(loader_batches(pack, world, batch, 2)):
        for got_images, got_labels in batches:  # arcface_torch's pixels and labels, in its order
            assert torch.equal(got_images, images[rank].float()) and torch.equal(got_labels, labels[rank])

    config = json.loads(json.dumps(meta["config"]))  # the settings the import wrote, which continue the run
    config["data"].update(source="recordio", path=str(pack), workers=0, flip=False, seed=SEED,
                          normalize="arcface_torch")
    config["train"].update(output_dir=str(tmp_path / "run"), log_every=1, tensorboard=False)
    config["validation"]["interval"] = 0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "ds.json").write_text(json.dumps({**meta["ds_config"], "train_micro_batch_size_per_gpu": batch}))
    log = tmp_path / "train.log"
    job = torchrun(["--config", str(tmp_path / "config.yaml"), "--ds-config", str(tmp_path / "ds.json"),
                    "--resume", str(tag)], log, nproc=world)
    assert job.wait(timeout=280) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert f"continuing from {tag} at iteration 3" in text, text[-4000:]
    losses = {int(i): float(v) for i, v in re.findall(r"train: iter (\d+), loss ([-+0-9.e]+)", text)}
    first = reference["resumed_global_step"]  # the log's number of the step after the saved state
    print(f"megaface train: iter {first} {losses[first]:.6f}, iter {first + 1} {losses[first + 1]:.6f}; "
          f"arcface_torch {reference['next_loss']:.6f}, {reference['following_loss']:.6f}")
    assert abs(losses[first] - reference["next_loss"]) < 1e-4, (losses[first], reference["next_loss"])
    # the step after: arcface_torch all-reduces backbone gradients in fp16 (DDP's fp16_compress_hook)
    assert abs(losses[first + 1] - reference["following_loss"]) < 1e-3, (losses[first + 1],
                                                                          reference["following_loss"])
    assert (tmp_path / "run" / "checkpoints" / "step_00000020" / "meta.json").is_file()
