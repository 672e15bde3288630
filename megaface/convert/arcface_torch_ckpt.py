"""arcface_torch training checkpoints <-> megaface checkpoints.

arcface_torch's train_v2.py saves, per rank, `checkpoint_gpu_{rank}.pt` = {epoch, global_step,
state_dict_backbone (same on every rank), state_dict_softmax_fc {"weight": this rank's PartialFC_V2 rows},
state_optimizer (one torch SGD over [backbone params..., FC7 weight]), state_lr_scheduler (PolynomialLRWarmup)}.
Its class split is megaface's (`class_range`: the first num_classes % W ranks hold one extra row).

import (`import_arcface_torch`): one megaface tag directory at `world_size` W:
    meta.json       network, num_classes, class_ranges for W, zero_stage 0, fp32, the experiment config that
                    continues the run (optim sgd/polynomial with its lr, momentum, weight decay, warm-up, total,
                    power; model.bn_eps 1e-5; head ArcFace 64 / (1, 0.5, 0) with straight_through and no margin
                    fallback, as its CombinedMarginLoss computes it; FC7 unclipped, backbone clipped at 5), digests
    ds/             written by DeepSpeed itself (ZeRO-0 fp32 engine over the backbone; its torch SGD carries
                    arcface_torch's backbone momentum, parameter by parameter name). The backbone is rank 0's:
                    the ranks' copies differ only in BatchNorm running statistics (DDP with
                    broadcast_buffers=False), and megaface keeps rank 0's as its own saves do. MobileFaceNet's
                    embedding BatchNorm scale, trained there, is a fixed buffer here: its momentum is dropped
    fc7/            the FC7 rows and their momentum, merged over the source ranks and re-split for W ranks
    trainer/        iteration = global_step (the schedule position); the loader starts its epoch afresh
                    (arcface_torch's sampler position has no megaface equivalent)
ZeRO-0 fp32 files load at any world size; a run at another ZeRO stage or precision loads the weights and
starts the backbone momentum afresh (megaface's resume says so).

export (`export_arcface_torch`): the reverse, W files train_v2.py resumes from (`resume=True`, same
output folder): backbone + its SGD momentum, FC7 rows of each rank + momentum, lr scheduler state.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from megaface.checkpoint.fc7_shards import (
    MERGED_FORMAT,
    load_checkpoint_shards,
    merge_shards,
    split_merged,
)
from megaface.checkpoint.layout import DS_DIR
from megaface.head.sharding import class_range

CKPT_NAME = re.compile(r"^checkpoint_gpu_(\d+)\.pt$")
_KEYS = ("epoch", "global_step", "state_dict_backbone", "state_dict_softmax_fc", "state_optimizer",
         "state_lr_scheduler")
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
ARCFACE_BN_EPS = 1e-5
ARCFACE_MARGIN = (1.0, 0.5, 0.0)  # train_v2's CombinedMarginLoss(64, *cfg.margin_list): the configs' ArcFace
ARCFACE_SCALE = 64.0


def read_arcface_torch(ckpt_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every rank's checkpoint_gpu_{rank}.pt in rank order, checked for a complete, consistent set."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{ckpt_dir} is not a directory (expected arcface_torch's output folder holding "
                                "checkpoint_gpu_0.pt ...)")
    ranks = {int(m.group(1)): p for p in ckpt_dir.iterdir() if (m := CKPT_NAME.match(p.name))}
    if not ranks:
        raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint_gpu_<rank>.pt (train_v2.py writes them with "
                                "save_all_states=True)")
    missing = [r for r in range(max(ranks) + 1) if r not in ranks]
    if missing:
        raise ValueError(f"{ckpt_dir}: checkpoint_gpu_{missing[0]}.pt is missing (found ranks {sorted(ranks)}); "
                         "copy every rank's file of the run")
    states: list[dict[str, Any]] = []
    for rank in range(len(ranks)):
        try:
            state = torch.load(ranks[rank], map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - truncated zips raise many kinds
            raise ValueError(f"{ranks[rank]} is not a readable torch file ({type(err).__name__}: "
                             f"{str(err)[:160]}); is it truncated?") from None
        absent = [k for k in _KEYS if not isinstance(state, dict) or k not in state]
        if absent:
            raise ValueError(f"{ranks[rank]} lacks {absent}: not a train_v2.py resume checkpoint (model.pt holds "
                             "only the backbone: use convert import-insightface for it)")
        if states and (state["global_step"], state["epoch"]) != (states[0]["global_step"], states[0]["epoch"]):
            raise ValueError(f"{ranks[rank]}: global_step {state['global_step']} / epoch {state['epoch']} differ "
                             f"from rank 0's {states[0]['global_step']} / {states[0]['epoch']}: files of two saves")
        states.append(state)
    return states


def _param_names(backbone: dict[str, torch.Tensor]) -> list[str]:
    """arcface_torch's backbone.parameters() order: the state_dict order without the BatchNorm buffers."""
    return [k for k in backbone if not k.endswith(_BUFFER_SUFFIXES)]


def _momenta(state: dict[str, Any], names: list[str], path: str) -> tuple[dict[str, torch.Tensor], Any, dict]:
    """(backbone momentum by name, FC7 momentum or None, the backbone's param group) of one rank's optimizer."""
    opt = state["state_optimizer"]
    groups = opt.get("param_groups", [])
    if len(groups) != 2 or len(groups[0]["params"]) != len(names) or len(groups[1]["params"]) != 1:
        raise ValueError(f"{path}: state_optimizer has groups of {[len(g['params']) for g in groups]} parameters, "
                         f"expected [{len(names)}, 1] (train_v2's SGD over backbone, FC7)")
    if "momentum" not in groups[0]:
        raise ValueError(f"{path}: the optimizer is not SGD (param group keys {sorted(groups[0])}); only "
                         "optimizer='sgd' checkpoints carry momentum megaface maps")
    buffers = {index: s.get("momentum_buffer") for index, s in opt.get("state", {}).items()}
    backbone = {name: buffers[i] for name, i in zip(names, groups[0]["params"], strict=True)
                if buffers.get(i) is not None}
    return backbone, buffers.get(groups[1]["params"][0]), groups[0]


def merged_fc7(states: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """The full FC7 (MERGED_FORMAT) from every rank's rows and momentum, checked against the class split."""
    weights = [s["state_dict_softmax_fc"]["weight"].float() for s in states]
    num_classes, world = sum(w.shape[0] for w in weights), len(states)
    for rank, w in enumerate(weights):
        if w.shape[0] != class_range(num_classes, world, rank)[1]:
            expected = class_range(num_classes, world, rank)[1]
            raise ValueError(f"checkpoint_gpu_{rank}.pt has {w.shape[0]} FC7 rows, arcface_torch's split of "
                             f"{num_classes} classes over {world} ranks gives {expected}")
    momenta = [_momenta(s, names, f"checkpoint_gpu_{r}.pt")[1] for r, s in enumerate(states)]
    if any(m is None for m in momenta) and not all(m is None for m in momenta):
        raise ValueError("some ranks carry FC7 momentum and others do not: files of two saves")
    group = states[0]["state_optimizer"]["param_groups"][1]
    return {"format": MERGED_FORMAT, "weight": torch.cat(weights),
            "momentum": None if momenta[0] is None else torch.cat([m.float() for m in momenta]),
            "num_classes": num_classes, "embedding_size": int(weights[0].shape[1]), "source_world_size": world,
            "class_ranges": [list(class_range(num_classes, world, r)) for r in range(world)], "optimizer": "ShardSGD",
            "hyper": {k: group.get(k) for k in ("lr", "momentum", "weight_decay")} | {"sparse": None}}


def schedule_config(scheduler: dict[str, Any], group: dict[str, Any]) -> list[str]:
    """megaface optim/train overrides reproducing PolynomialLRWarmup and the SGD hyper-parameters."""
    base = (scheduler.get("base_lrs") or [group.get("initial_lr", group["lr"])])[0]
    out = ["--optim.name=sgd", f"--optim.lr={base!r}", f"--optim.momentum={group['momentum']!r}",
           f"--optim.weight_decay={group['weight_decay']!r}"]
    if "warmup_iters" in scheduler and "total_iters" in scheduler:
        out += ["--optim.schedule=polynomial", f"--optim.warmup_steps={int(scheduler['warmup_iters'])}",
                f"--optim.power={float(scheduler.get('power', 1.0))!r}",
                f"--train.max_steps={int(scheduler['total_iters'])}"]
    return out


@contextlib.contextmanager
def _one_rank_group() -> Iterator[None]:
    """A 1-rank gloo group (and the environment DeepSpeed reads) for the block, unless a group exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _save_ds(tmp: Path, cfg: Any, backbone_state: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor],
             iteration: int) -> dict[str, Any]:
    """Write ds/ with DeepSpeed's own save (ZeRO-0 fp32, world 1) in a fresh process; returns its config.

    A fresh process because DeepSpeed caches the process group it first saw: a second conversion in one
    process (or a caller's own group) would meet a destroyed or foreign group."""
    import multiprocessing

    handoff = tmp / "_ds_input.pt"
    torch.save({"config": json.loads(json.dumps(cfg.to_dict())), "backbone": backbone_state, "momentum": momentum,
                "iteration": iteration}, handoff)
    process = multiprocessing.get_context("spawn").Process(target=_save_ds_main, args=(str(tmp), str(handoff)))
    process.start()
    process.join()
    handoff.unlink()
    if process.exitcode != 0:
        raise RuntimeError(f"the DeepSpeed save of {tmp / DS_DIR} failed (exit code {process.exitcode}); its "
                           "traceback is above")
    return DS_CONFIG


DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 5.0,
             "zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True,
             "steps_per_print": 1_000_000_000}


def _save_ds_main(tmp: str, handoff: str) -> None:
    """The fresh process of `_save_ds`: build the ZeRO-0 fp32 engine, give its SGD the momentum, save."""
    import deepspeed
    import yaml

    from megaface.config import load_config
    from megaface.distributed.ds_shm import skip_shm_build
    from megaface.models import build_model

    given = torch.load(handoff, weights_only=False)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as config_file:
        yaml.safe_dump(given["config"], config_file)
    cfg = load_config(config_file.name)
    os.unlink(config_file.name)
    with _one_rank_group():
        skip_shm_build()
        model = build_model(cfg.model.network, embedding_size=cfg.model.embedding_size, **cfg.model.build_options())
        model.load_state_dict(given["backbone"])
        # the trainer's backbone optimizer for optim.name=sgd (megaface.train.optim, which convert may not
        # import): one torch SGD group, so DeepSpeed's saved state loads into it on resume
        sgd = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                              weight_decay=cfg.optim.weight_decay)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=sgd, config=dict(DS_CONFIG),
                                               dist_init_required=False)
        params = dict(engine.module.named_parameters())
        for name, buffer in given["momentum"].items():
            if name in params:  # arcface_torch's fixed final BN scale is a parameter there, a buffer here
                sgd.state[params[name]]["momentum_buffer"] = buffer.float().clone()
        engine.global_steps = given["iteration"]
        engine.save_checkpoint(tmp, tag=DS_DIR, save_latest=False)


def import_arcface_torch(ckpt_dir: str | os.PathLike, output: str | os.PathLike, network: str,
                         world_size: int = 1) -> str:
    """Write a megaface checkpoint tag directory `output` from arcface_torch's resume files; returns a report."""
    import megaface
    from megaface.checkpoint import (
        CHECKPOINT_FORMAT,
        FC7_DIR,
        META_FILE,
        TRAINER_DIR,
        fc7_shard_file_name,
        trainer_file_name,
    )
    from megaface.checkpoint.integrity import FILES_KEY, FINITE_KEY, digests, list_files
    from megaface.config import load_config
    from megaface.convert.insightface import import_insightface
    from megaface.fileio import atomic_output_dir
    from megaface.models import build_model

    if world_size < 1:
        raise ValueError(f"--world-size {world_size}: must be >= 1 (the ranks of the megaface run that resumes)")
    states = read_arcface_torch(ckpt_dir)
    first = states[0]
    backbone, report = import_insightface(first["state_dict_backbone"], network)
    names = _param_names(first["state_dict_backbone"])
    momentum, _, group = _momenta(first, names, "checkpoint_gpu_0.pt")
    merged = merged_fc7(states, names)
    if merged["embedding_size"] != report.embedding_size:
        raise ValueError(f"FC7 rows are {merged['embedding_size']}-d but the backbone embeds "
                         f"{report.embedding_size}-d: the files come from different runs")
    iteration = int(first["global_step"])
    cfg = load_config(None, [f"--model.network={network}", f"--model.embedding_size={report.embedding_size}",
                             f"--model.bn_eps={ARCFACE_BN_EPS}", f"--head.num_classes={merged['num_classes']}",
                             f"--head.scale={ARCFACE_SCALE}", "--head.margin=" + json.dumps(list(ARCFACE_MARGIN)),
                             "--head.clip_grad_norm=0", "--head.straight_through=true",
                             "--head.margin_fallback=none", "--data.normalize=arcface_torch",
                             *schedule_config(first["state_lr_scheduler"], group)]
                      + ([] if "total_iters" in first["state_lr_scheduler"]
                         else [f"--train.max_steps={iteration + 1}"]))
    shards = split_merged(merged, world_size)
    meta = {"format": CHECKPOINT_FORMAT, "iteration": iteration, "megaface_version": megaface.__version__,
            "network": network, "embedding_size": report.embedding_size, "num_classes": merged["num_classes"],
            "world_size": world_size, "class_ranges": [[s["class_start"], s["num_local"]] for s in shards],
            "zero_stage": 0, "precision": "fp32", "parallel": "model", "normalize": "arcface_torch",
            "config": cfg.to_dict(), "source": {"format": "arcface_torch", "dir": str(ckpt_dir),
                                                "world_size": len(states), "epoch": int(first["epoch"]),
                                                "global_step": iteration}}
    trainer = {"iteration": iteration, "skipped_steps": 0, "best": {},
               # arcface_torch's sampler position has no megaface counterpart: resume starts the loader's epoch
               "loader": {"format": "arcface_torch", "epoch": int(first["epoch"])},
               # the keys megaface.train.checkpointing.set_rng_state restores
               "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
    with atomic_output_dir(output) as tmp:
        meta["ds_config"] = _save_ds(tmp, cfg, backbone, momentum, iteration)
        (tmp / FC7_DIR).mkdir()
        for shard in shards:
            torch.save(shard, tmp / FC7_DIR / fc7_shard_file_name(shard["rank"], world_size))
        (tmp / TRAINER_DIR).mkdir()
        for rank in range(world_size):
            torch.save(trainer, tmp / TRAINER_DIR / trainer_file_name(rank))
        meta.update({FINITE_KEY: True, FILES_KEY: digests(tmp, list_files(tmp))})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    trained = {name for name, _ in build_model(network, embedding_size=report.embedding_size).named_parameters()}
    mapped, dropped = [n for n in momentum if n in trained], [n for n in momentum if n not in trained]
    dropped_note = (f"; momentum of {dropped} not kept: megaface holds that BatchNorm scale fixed"
                    if dropped else "")
    return (f"wrote megaface checkpoint {output}: {network} at iteration {iteration} (arcface_torch epoch "
            f"{first['epoch']}), FC7 {merged['num_classes']} x {merged['embedding_size']} from {len(states)} ranks "
            f"resharded for {world_size}, momentum of {len(mapped)} backbone tensors"
            f"{' and FC7' if merged['momentum'] is not None else ''}{dropped_note}\n"
            f"resume it with: megaface train CONFIG --train.resume={output} --model.bn_eps={ARCFACE_BN_EPS} "
            "(its meta.json config holds the optim/schedule/head settings that continue arcface_torch's run)")


def polynomial_warmup_lr(done: int, base_lr: float, warmup: int, total: int, power: float) -> float:
    """The lr arcface_torch's PolynomialLRWarmup holds after `done` steps (its `_last_lr`). The same values as
    megaface.train.schedule.polynomial_lr, which convert may not import; a test keeps the two equal."""
    if done == 0:
        return base_lr
    if done <= warmup:
        return base_lr * done / warmup
    return base_lr * (1.0 - (min(done, total) - warmup) / (total - warmup)) ** power


def _arcface_param_names(model: torch.nn.Module) -> list[str]:
    """arcface_torch's parameter order for megaface's `model`: its final BatchNorm scale is a (frozen) parameter
    there and a buffer here, registered before the bias."""
    from megaface.models.layers import ScalelessBatchNorm1d

    names = [name for name, _ in model.named_parameters()]
    for module_name, module in model.named_modules():
        if isinstance(module, ScalelessBatchNorm1d):
            names.insert(names.index(f"{module_name}.bias"), f"{module_name}.weight")
    return names


def _backbone_momentum(tag_dir: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Backbone SGD momentum by parameter name from a ZeRO-0 fp32 checkpoint (empty otherwise)."""
    from megaface.checkpoint.layout import DS_MODEL_STATES

    states = torch.load(tag_dir / DS_DIR / DS_MODEL_STATES, map_location="cpu", weights_only=False)
    optimizer = states.get("optimizer") or {}
    groups = optimizer.get("param_groups", [])
    names = [name for name, _ in model.named_parameters()]
    if len(groups) != 1 or len(groups[0]["params"]) != len(names):
        return {}
    buffers = optimizer.get("state", {})
    return {name: buffers[i]["momentum_buffer"].float() for name, i in zip(names, groups[0]["params"], strict=True)
            if "momentum_buffer" in buffers.get(i, {})}


def _sgd_group(lr: float, o: Any, initial_lr: float, params: list[int]) -> dict[str, Any]:
    """A param group as this torch's SGD.state_dict() writes it, plus the scheduler's initial_lr."""
    keys = torch.optim.SGD([torch.zeros(1)], lr=lr, momentum=o.momentum, weight_decay=o.weight_decay).state_dict()
    return {**keys["param_groups"][0], "initial_lr": initial_lr, "params": params}


def export_arcface_torch(checkpoint: str | os.PathLike, output: str | os.PathLike, world_size: int) -> str:
    """Write checkpoint_gpu_{rank}.pt for `world_size` ranks and model.pt, as train_v2.py saves them."""
    from megaface.checkpoint import TRAINER_DIR, read_meta, resolve_checkpoint, trainer_file_name
    from megaface.checkpoint.backbone import checkpoint_backbone_state
    from megaface.config import load_config
    from megaface.convert.insightface import export_insightface
    from megaface.fileio import atomic_output_dir
    from megaface.models import build_model

    if world_size < 1:
        raise ValueError(f"--world-size {world_size}: must be >= 1 (the GPUs of the arcface_torch run)")
    tag_dir = Path(resolve_checkpoint(checkpoint))
    meta = read_meta(tag_dir)
    if meta.get("parallel") != "model":
        raise ValueError(f"{tag_dir}: parallel={meta.get('parallel')!r}; arcface_torch's PartialFC_V2 is a "
                         "model-parallel FC7 (parallel='model')")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as config_file:
        json.dump(meta["config"], config_file)  # JSON is YAML
    try:
        cfg = load_config(config_file.name)
    finally:
        os.unlink(config_file.name)
    o, t = cfg.optim, cfg.train
    if o.name != "sgd" or o.schedule != "polynomial" or t.max_steps is None or o.warmup_epochs:
        raise ValueError(f"{tag_dir}: optim {o.name}/{o.schedule} with train.max_steps={t.max_steps}, "
                         f"optim.warmup_epochs={o.warmup_epochs}: train_v2.py resumes only SGD with "
                         "PolynomialLRWarmup counted in steps; use export-insightface for the backbone weights")
    model = build_model(cfg.model.network, embedding_size=cfg.model.embedding_size, **cfg.model.build_options())
    model.load_state_dict(checkpoint_backbone_state(tag_dir))
    backbone = export_insightface(model.state_dict(), cfg.model.network)
    backbone = {key: backbone[key] for key in _arcface_state_order(model)}
    momentum = _backbone_momentum(tag_dir, model) if meta.get("zero_stage") == 0 \
        and meta.get("precision") == "fp32" else {}
    merged = merge_shards(*load_checkpoint_shards(tag_dir))
    iteration = int(meta["iteration"])
    trainer = torch.load(tag_dir / TRAINER_DIR / trainer_file_name(0), map_location="cpu", weights_only=False)
    epoch = int((trainer.get("loader") or {}).get("epoch", 0))
    names = _arcface_param_names(model)
    lrs = [polynomial_warmup_lr(iteration, base, o.warmup_steps, t.max_steps, o.power)
           for base in (o.lr, o.lr * cfg.head.lr_scale)]
    scheduler = {"warmup_iters": o.warmup_steps, "total_iters": t.max_steps, "power": o.power,
                 "base_lrs": [o.lr, o.lr * cfg.head.lr_scale], "last_epoch": iteration, "_step_count": iteration + 1,
                 "verbose": False, "_get_lr_called_within_step": False, "_last_lr": lrs, "_is_initial": False}
    groups = [_sgd_group(lrs[0], o, o.lr, list(range(len(names)))),
              _sgd_group(lrs[1], o, o.lr * cfg.head.lr_scale, [len(names)])]
    with atomic_output_dir(output) as tmp:
        for rank in range(world_size):
            start, count = class_range(merged["num_classes"], world_size, rank)
            state = {i: {"momentum_buffer": momentum[n].clone()} for i, n in enumerate(names) if n in momentum}
            if merged.get("momentum") is not None:
                state[len(names)] = {"momentum_buffer": merged["momentum"][start:start + count].clone()}
            torch.save({"epoch": epoch, "global_step": iteration, "state_dict_backbone": backbone,
                        "state_dict_softmax_fc": {"weight": merged["weight"][start:start + count].to(torch.float32, copy=True)},
                        "state_optimizer": {"state": state, "param_groups": groups},
                        "state_lr_scheduler": scheduler}, tmp / f"checkpoint_gpu_{rank}.pt")
        torch.save(backbone, tmp / "model.pt")
    note = "" if momentum else " (backbone momentum not exported: it is mapped from ZeRO-0 fp32 checkpoints only)"
    return (f"wrote arcface_torch resume files {output}: checkpoint_gpu_0..{world_size - 1}.pt + model.pt, "
            f"{cfg.model.network} at global_step {iteration}, FC7 {merged['num_classes']} classes{note}; resume "
            f"with train_v2.py (resume=True, output={output}, {world_size} GPUs)")


def _arcface_state_order(model: torch.nn.Module) -> list[str]:
    """megaface's state_dict keys in arcface_torch's order (a BatchNorm's weight before its bias)."""
    keys = list(model.state_dict())
    for name in _arcface_param_names(model):
        if name.endswith(".weight") and name not in dict(model.named_parameters()):
            keys.remove(name)
            keys.insert(keys.index(name[: -len("weight")] + "bias"), name)
    return keys
