"""The iteration loop around `megaface.train.step.train_step`: lr, accumulation, logging, validation, checkpoints."""

from __future__ import annotations

import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from megaface.checkpoint import LATEST, best_file_name, find_checkpoint, save_backbone_file
from megaface.config import ExperimentConfig
from megaface.data.loader import WorkerDied, worker_death
from megaface.distributed import comm, shutdown
from megaface.distributed.heartbeat import EXIT_PEER_FAILED, Heartbeat
from megaface.train.build import Run, build_run, init_process_group
from megaface.train.checkpoint_writes import CheckpointNotWritten
from megaface.train.checkpointing import NonFiniteState, healthy_note, load_checkpoint, save_checkpoint
from megaface.train.interrupt import EXIT_CODES, StopSignals, StopVote
from megaface.train.logger import TrainLogger
from megaface.train.rewind import RewindPolicy
from megaface.train.run_lock import RunLock
from megaface.train.schedule import schedule_lr, set_lr
from megaface.train.step import NonFiniteLoss, loss_scale, read_losses, train_step


def _batches(loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches; the loader itself advances its epoch (and records its position for resume)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError(f"the training data gives no full batch per rank (len {len(loader)}): use a "
                             "smaller train_micro_batch_size_per_gpu or more data")


def run_training(cfg: ExperimentConfig, ds_raw: dict[str, Any], argv: list[str] | None = None) -> int:
    """Set up, resume, train; returns the process exit code (0 ok, 1 non-finite loss, a dead loader worker or a
    checkpoint that could not be written, 2 user error, 3 another rank failed first or a collective timed out,
    130 / 143 stopped by SIGINT / SIGTERM after a checkpoint). `argv` (the command's arguments) goes into the
    resume command printed after a signal."""
    import torch.distributed as dist

    started = time.perf_counter()
    owns_group = not dist.is_initialized()  # a caller's (e.g. a test harness's) group is left alone
    state = init_process_group(cfg.train.collective_timeout_s)
    prefix = f"[rank {state.rank}] " if state.world_size > 1 else ""

    def log(message: str) -> None:
        if state.is_main:
            print(message, flush=True)

    lock = None
    heartbeat = Heartbeat(state, cfg.train.collective_timeout_s).start()  # every rank learns why a peer ended
    signals = StopSignals(state).__enter__()  # from here a signal stops the run at an iteration's end
    try:
        lock = _lock_output(Path(cfg.train.output_dir), state, log)
        run = build_run(cfg, ds_raw, state, log)
        _resume(run, log)
        log(f"start-up: {time.perf_counter() - started:.1f} s to the first step (world size {state.world_size}, "
            f"ZeRO-{run.meta()['zero_stage']}, {run.parts.precision}, {run.total_steps} iterations, global batch "
            f"{run.ds['train_batch_size']}, {run.num_classes} classes, head {cfg.head.parallel}-parallel)")
        return _train(run, log, signals, argv)
    except (ValueError, FileNotFoundError) as err:
        peer = heartbeat.peer_error()
        if peer is not None and not peer.endswith(" ".join(str(err).split())):  # it follows another rank's
            return _peer_failed(heartbeat, prefix, peer)
        print(f"{prefix}megaface train: error: {err}", file=sys.stderr, flush=True)
        heartbeat.report_error(" ".join(str(err).split()), every_rank=isinstance(err, _RaisedOnEveryRank))
        return 1 if isinstance(err, WorkerDied) else 2  # a dead worker is the environment, not the input
    except CheckpointNotWritten as err:  # full disk, quota, ulimit -f: the environment, as in megaface.cli
        # Every rank raised it (the save agrees on every rank's failures): each prints its own line.
        print(f"{prefix}megaface train: error: {err}", file=sys.stderr, flush=True)
        heartbeat.report_error(" ".join(str(err).split()), every_rank=True)
        return 1
    except RuntimeError as err:
        if (peer := heartbeat.peer_error()) is not None:  # gloo's "Connection closed by peer" and the like
            return _peer_failed(heartbeat, prefix, peer)
        if (death := worker_death(err, cfg.data.workers)) is not None:  # raised by torch's SIGCHLD handler
            print(f"{prefix}megaface train: error: {death}", file=sys.stderr, flush=True)
            heartbeat.report_error(death)
            return 1
        if not _is_timeout(err) and (lost := heartbeat.explain_lost_peer()) is not None:  # a SIGKILLed rank
            return _peer_failed(heartbeat, prefix, lost)
        if not _is_timeout(err):
            raise
        if (silent := heartbeat.explain_timeout()) is not None:  # the heartbeat names the silent rank
            return _peer_failed(heartbeat, prefix, silent)
        message = _timeout_message(err, cfg.train.collective_timeout_s, state.hosts, state.rank)
        print(f"{prefix}megaface train: error: {message}", file=sys.stderr, flush=True)
        return 3
    finally:
        heartbeat.stop()
        signals.__exit__()
        if lock is not None:
            lock.release()
        if owns_group:
            shutdown()


def _peer_failed(heartbeat: Heartbeat, prefix: str, message: str) -> int:
    """The line of a rank that ended because another rank failed first: that rank's own error."""
    if heartbeat.take_report():
        print(f"{prefix}megaface train: error: {message}", file=sys.stderr, flush=True)
    return EXIT_PEER_FAILED


class _RaisedOnEveryRank(ValueError):
    """A user error every rank raises after agreeing on it in a collective: each prints its own line and nothing
    is posted to the heartbeat (see megaface.distributed.heartbeat)."""


def _lock_output(output_dir: Path, state: Any, log: Callable[[str], None]) -> RunLock | None:
    """Collective: rank 0 takes the output directory's lock; every rank raises the same error if it is busy."""
    lock, error = None, None
    if state.is_main:
        try:
            lock = RunLock(output_dir, log)
        except ValueError as err:
            error = str(err)
    error = comm.broadcast_object(error, src=0, group=state.group)
    if error is not None:
        raise _RaisedOnEveryRank(error)
    return lock


def _is_timeout(err: RuntimeError) -> bool:
    text = str(err).lower()
    return "timed out" in text or "timeout" in text


def _timeout_message(err: RuntimeError, timeout_s: float, hosts: tuple[str, ...] = (), rank: int = 0) -> str:
    """One line: which collective timed out, the peer gloo/nccl named (when it did), the host it runs on
    (`hosts`: per rank, from the start-up) and what to do."""
    import re

    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    peer = re.search(r"(?:from|peer|rank)[ =]*\[?(\d+)\]?", str(err))
    who = f"rank {peer.group(1)} (as the backend reports it)" if peer else "a peer rank"
    if peer and int(peer.group(1)) < len(hosts):
        who += f" on {hosts[int(peer.group(1))]}"
    elif not peer and hosts:
        others = sorted(set(hosts) - {hosts[rank]})  # gloo does not say whom it waited for: another host
        if others:
            who += f" on {others[0]}" if len(others) == 1 else f" on one of {', '.join(others)}"
    return (f"a collective waited more than train.collective_timeout_s={timeout_s:g} s for {who}: it is stopped, "
            f"hung or dead ({first}); check that rank's log and host, then resume with --resume latest (raise "
            "train.collective_timeout_s if slow steps - first GPU steps, long validation - are expected)")


def _resume(run: Run, log: Callable[[str], None]) -> None:
    resume = run.cfg.train.resume
    if not resume:
        return
    try:  # auto: latest when the output directory has a checkpoint, else a fresh start (requeued jobs)
        tag_dir = find_checkpoint(LATEST if resume == "auto" else resume, run.output_dir)
    except FileNotFoundError:
        if resume not in (LATEST, "auto"):
            raise
        log(f"resume: no checkpoint under {run.output_dir} yet, starting from scratch")
        return
    from megaface.config import zero_stage

    trainer = load_checkpoint(run.parts, tag_dir, run.expected(), zero_stage(run.ds), run.parts.precision, log)
    run.start_iteration = int(trainer["iteration"])
    run.skipped_steps = int(trainer.get("skipped_steps", 0))
    try:
        run.loader.load_state_dict(trainer["loader"])
    except ValueError as err:  # e.g. another world size: the loader cannot map the old position
        log(f"resume: loader position not restored ({err}); continuing from the start of its epoch")
    if run.validator is not None and trainer.get("best"):
        run.validator.best = dict(trainer["best"])
    run.resumed_from = tag_dir
    log(f"resume: continuing from {tag_dir} at iteration {run.start_iteration}")


def _train(run: Run, log: Callable[[str], None], signals: StopSignals, argv: list[str] | None) -> int:
    cfg, parts = run.cfg, run.parts
    t = cfg.train
    logger = TrainLogger(run.state, run.output_dir, int(run.ds["train_batch_size"]), run.total_steps,
                         run.start_iteration, t.log_every, t.throughput_window, t.tensorboard, t.progress)
    if run.validator is not None:
        run.validator.writer = logger.writer
    batches = _batches(run.loader)
    fp16 = parts.precision == "fp16"
    rewinds = RewindPolicy.from_config(t)
    vote = StopVote(run.state, signals, t.save_every_minutes)
    # Iteration losses stay on the device until the loop logs, validates or saves (no per-step host sync);
    # per-iteration seconds then time the host side, and the read's wait lands in the iteration that reads,
    # so the logger's windowed throughput stays right.
    pending: list[torch.Tensor] = []
    records: list[tuple[int, float, float, float | None, int]] = []
    iteration = run.start_iteration
    try:
        while iteration < run.total_steps:
            lr = schedule_lr(iteration, cfg.optim, run.milestones, run.warmup_steps, run.total_steps)
            lr *= rewinds.lr_scale(iteration)
            set_lr(parts, lr, cfg.head.lr_scale)
            start = time.perf_counter()
            losses = [train_step(parts, *next(batches)) for _ in range(run.gas)]
            pending.append(torch.stack(losses).mean())
            run.skipped_steps = int(parts.engine.skipped_steps)
            records.append((iteration, time.perf_counter() - start, lr,
                            loss_scale(parts.engine) if fp16 else None, run.skipped_steps))
            done = iteration + 1
            stop_signal, timed = vote.poll()  # what every rank voted for one iteration ago
            validate, save = _due(run, done)
            save = save or timed or bool(stop_signal)
            try:
                if done % t.log_every == 0 or validate or save:
                    values = read_losses(pending, parts, records[0][0])  # before any save
                    for value, (it, seconds, it_lr, scale, skipped) in zip(values, records, strict=False):
                        logger.iteration(it, value, seconds, it_lr, scale, skipped)
                    pending.clear()
                    records.clear()
                saved = _after_iteration(run, done, logger, validate, save)
            except (NonFiniteLoss, NonFiniteState) as err:
                pending.clear()
                records.clear()
                resumed = _rewind(run, rewinds, err, iteration, logger)
                if resumed is None:
                    return 1
                iteration = resumed
                continue
            if saved is not None:
                vote.saved()
            if stop_signal:
                name = signal.Signals(stop_signal).name
                logger.info(f"train: stopped by {name} after {done} iterations: saved {saved}; resume with: "
                            f"{_resume_command(argv)}")
                return EXIT_CODES[signal.Signals(stop_signal)]
            iteration = done
    finally:
        if sys.exc_info()[0] is None:  # after an error a peer may never post its vote: do not wait for it
            vote.close()
        logger.close()
    if fp16 and run.skipped_steps:
        log(f"train: {run.skipped_steps} iterations skipped by fp16 loss scaling (overflow / non-finite loss)")
    return 0


def _rewind(run: Run, rewinds: RewindPolicy, err: Exception, iteration: int, logger: TrainLogger) -> int | None:
    """Collective: after a divergence, rewind (returns the iteration to continue from) or say why the run stops
    (returns None)."""
    if isinstance(err, NonFiniteLoss):
        reason = f"non-finite loss ({err.value}) at iteration {err.iteration}"
        advice = "stopping without saving"
        iteration = err.iteration
    else:
        reason = str(err)
        advice = "stopping, checkpoint not saved"
    tag = rewinds.target(run.output_dir, run.state)
    if tag is None:
        logger.info(f"train: {reason}: {advice} ({rewinds.stop_note()}lower optim.lr, set gradient_clipping in the "
                    f"DeepSpeed JSON); {healthy_note(run.output_dir)}")
        return None
    from megaface.config import zero_stage

    trainer = load_checkpoint(run.parts, tag, run.expected(), zero_stage(run.ds), run.parts.precision, logger.info)
    resumed = int(trainer["iteration"])
    run.skipped_steps = int(trainer.get("skipped_steps", 0))
    rewinds.rewound(reason, iteration, tag, resumed, logger.info)
    logger.scalars({"train/rewinds": float(rewinds.count)}, resumed)
    return resumed


def _resume_command(argv: list[str] | None) -> str:
    """The command line that continues this run: the same arguments with --resume latest."""
    if argv is None:
        return "the same command with --resume latest"
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not (arg.startswith("--resume=") or arg.startswith("--train.resume=")):
            kept.append(arg)
    return shlex.join(["megaface", "train", *kept, "--resume", LATEST])


def _due(run: Run, done: int) -> tuple[bool, bool]:
    """(validate, save) after `done` completed iterations."""
    last = done == run.total_steps
    validate = run.validator is not None and (done % run.cfg.validation.interval == 0 or last)
    save_every = run.cfg.train.save_every
    return validate, bool((save_every and done % save_every == 0) or last)


def _after_iteration(run: Run, done: int, logger: TrainLogger, validate: bool, save: bool) -> Path | None:
    """Validation and checkpoints after `done` completed iterations; the checkpoint saved, if any."""
    if validate:
        _validate(run, done, logger)
    if not save:
        return None
    trainer_state = {"iteration": done, "loader": run.loader.state_dict(), "skipped_steps": run.skipped_steps,
                     "best": dict(run.validator.best) if run.validator is not None else {}}
    path = save_checkpoint(run.parts, run.output_dir, done, trainer_state, run.meta(), run.cfg.train.keep_last)
    logger.info(f"checkpoint: saved {path}")
    return path


def _validate(run: Run, done: int, logger: TrainLogger) -> None:
    parts = run.parts
    # DeepSpeed (unlike DDP) never re-broadcasts buffers, so each rank's BatchNorm running statistics drift
    # apart; validate with rank 0's, the ones its checkpoints and best_*.pt files hold.
    comm.broadcast_buffers(parts.backbone, src=0, group=run.state.group)
    # embed_share feeds images in the backbone's own dtype (bf16/fp16 engines too) and returns fp32 embeddings
    logger.info(f"validation at iteration {done} ({time.perf_counter() - logger.started:.0f} s into training):")
    run.validator.run(parts.backbone, done, log=logger.info)
    if run.cfg.validation.save_best and run.validator.improved:
        state_dict = _backbone_state_dict(run)
        if run.state.is_main:
            meta = {k: v for k, v in run.meta().items() if k not in ("ds_config",)}
            for name in run.validator.improved:
                path = Path(run.output_dir) / best_file_name(name)
                save_backbone_file(path, state_dict, {**meta, "iteration": done, "pack": name,
                                                      "accuracy_flip": run.validator.best[name]})
                logger.info(f"validation: new best {name} {run.validator.best[name]:.5f} -> {path}")
        comm.barrier(run.state.group)


def _backbone_state_dict(run: Run) -> dict[str, torch.Tensor]:
    """Full fp32 backbone weights (collective under ZeRO-3, where every rank holds a partition)."""
    engine = run.parts.engine
    if run.meta()["zero_stage"] == 3:
        full = engine._zero3_consolidated_16bit_state_dict() or {}  # every rank must call it
        prefix = "backbone." if run.cfg.head.parallel == "data" else ""
        state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    else:
        state = run.parts.backbone.state_dict()
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
