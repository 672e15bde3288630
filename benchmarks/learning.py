"""Early-learning ablation: the quickstart with one knob changed per arm, several seeds, Accuracy-Flip over time.

    python benchmarks/learning.py --arms seed,straight_through --seeds 0,1,2 --max-steps 300 [--jobs 1]
    python benchmarks/learning.py --arms noisy_arcface,noisy_adaface,noisy_subcenter3,noisy_subcenter3_clean

The `noisy_*` arms (the heads of issue 23, docs/heads.md) train the shipped config on a noisy synthetic pack
(`megaface pack synthetic --mislabel-share 0.1 --low-quality-share 0.2`, written once into --cache-dir) and
validate on its val.bin (clean pairs) and val_lq.bin (the same pairs degraded), both of identities never seen
in training. `noisy_subcenter3_clean` takes the K = 3 model of `noisy_subcenter3` (same seed, same length:
run both), runs `megaface clean` on the pack (75 degrees) and retrains ArcFace (K = 1) on the cleaned pack
for the same number of iterations; its JSON line also carries what the cleaning dropped (clean.json).

Every run is a real two-rank job, `nice -n 19 torchrun --nproc_per_node 2 -m megaface train --config
launch/configs/quickstart.yaml --train.seed=S --data.seed=S <arm overrides>`, validating every 50 iterations
on the synthetic held-out identities (one cache for all runs: --cache-dir). The schedule has fixed milestones,
so a run stopped at --max-steps 100 is exactly the first 100 iterations of a 300-iteration run.

Prints one JSON line per arm:
    {"arm": ..., "overrides": [...], "seeds": [...], "max_steps": N,
     "acc": {"50": [mean, spread], ...}, "per_seed": {"50": [...], ...}}
spread = sample standard deviation over the seeds (0 for one seed). A run's log is kept under
--runs-dir/<arm>_s<seed>_n<steps>.log; with --reuse a finished log is parsed instead of training again
(so an interrupted ablation resumes, and a longer run also answers for the shorter checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
# The 300-iteration quickstart (milestones 220 / 280): a run stopped early is a prefix of the full run.
QUICKSTART = REPO / "launch" / "configs" / "quickstart_long.yaml"

# The seed's behaviour, spelled out, so every arm below changes exactly one thing relative to it
# (whatever the config defaults are at the time).
SEED_BEHAVIOUR = ["--head.straight_through=false", "--head.clip_grad_norm=null", "--ds.gradient_clipping=0",
                  "--head.margin_fallback=shifted", "--head.lr_scale=1.0", "--head.init_std=0.01",
                  "--model.init=per_group"]

ARMS: dict[str, list[str]] = {
    "seed": [],
    "straight_through": ["--head.straight_through=true"],
    "clip_backbone_5": ["--ds.gradient_clipping=5", "--head.clip_grad_norm=0"],
    "clip_both_5": ["--ds.gradient_clipping=5"],
    "fallback_none": ["--head.margin_fallback=none"],
    "fc7_lr_x2": ["--head.lr_scale=2.0"],
    "fc7_lr_x0.5": ["--head.lr_scale=0.5"],
    "fc7_init_0.001": ["--head.init_std=0.001"],
    "fc7_init_0.1": ["--head.init_std=0.1"],
    "fc7_init_1.0": ["--head.init_std=1.0"],
    "backbone_init_arcface_torch": ["--model.init=arcface_torch"],
    # The two best single changes together (FC7 init 0.1 and clipping of backbone and FC7 at 5).
    "fc7_init_0.1+clip_both_5": ["--head.init_std=0.1", "--ds.gradient_clipping=5"],
    # InsightFace's PyTorch recipe as a whole: straight-through, no fallback, backbone-only clipping, its init.
    "arcface_torch_all": ["--head.straight_through=true", "--head.margin_fallback=none",
                          "--ds.gradient_clipping=5", "--head.clip_grad_norm=0", "--model.init=arcface_torch"],
    # arcface_torch's schedule: linear warm-up, then linear decay to 0 at the last iteration (its first step
    # runs at the full lr). The decay depends on the run length, so this arm only runs at its full length.
    "schedule_polynomial": ["--optim.schedule=polynomial", "--optim.milestones=[]"],
    # The shipped config as it is (no overrides at all, not even SEED_BEHAVIOUR).
    "defaults": None,  # type: ignore[dict-item]
    # The shipped config in bf16 (DeepSpeed bf16; the head follows it: head.compute_dtype auto).
    "defaults_bf16": ["--ds.bf16.enabled=true"],
    # The shipped config with a bf16 FC7 master weight (stochastically rounded updates; docs/head_precision.md).
    "head_weight_bf16": ["--head.weight_dtype=bf16"],
    # The smallest head per class (docs/head_precision.md, 2.35 KB at rate 0.1): bf16 GEMMs, bf16 momentum and a
    # bf16 master weight, the backbone in fp32.
    "head_all_bf16": ["--head.compute_dtype=bf16", "--head.momentum_dtype=bf16", "--head.weight_dtype=bf16"],
}
# The heads on the noisy synthetic set (issue 23): the shipped config, one head each. AdaFace brings its
# repository's augmentations (crop in place p 0.2, low resolution p 0.2, photometric p 0.2: data.augment).
ADAFACE_AUGMENT = ["--data.augment.crop_p=0.2", "--data.augment.crop_mode=pad", "--data.augment.lowres_p=0.2",
                   "--data.augment.photometric_p=0.2"]
NOISY_ARMS: dict[str, list[str]] = {
    "noisy_arcface": [],
    "noisy_adaface": ["--head.margin=adaface", *ADAFACE_AUGMENT],
    "noisy_subcenter3": ["--head.subcenters=3"],
    "noisy_subcenter3_clean": ["--head.subcenters=1"],  # on the pack cleaned with noisy_subcenter3's model
}
ARMS.update(NOISY_ARMS)
CLEAN_ARM, CLEAN_SOURCE_ARM = "noisy_subcenter3_clean", "noisy_subcenter3"
# The noisy pack: the quickstart's 200 identities x 20 images and 600 pairs, 10% mislabelled, 20% degraded.
NOISY_PACK = {"identities": 200, "images-per-identity": 20, "val-pairs": 600, "mislabel-share": 0.1,
              "low-quality-share": 0.2, "seed": 0}
# Arms that start from the shipped config instead of SEED_BEHAVIOUR.
FROM_DEFAULTS = {"defaults", "defaults_bf16", "head_weight_bf16", "head_all_bf16", *NOISY_ARMS}
# Arms whose schedule depends on the run length: they cannot be stopped early and extended later.
FULL_LENGTH_ONLY = {"schedule_polynomial"}

VALIDATION = re.compile(r"validation at iteration (\d+)")
ACCURACY = re.compile(r"Accuracy-Flip: ([0-9.]+|nan)")
PACK = re.compile(r"Validation on \[([^\]]+)\]")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def parse_log(text: str) -> dict[int, float]:
    """{iteration: Accuracy-Flip} from a train log (the first pack after each 'validation at iteration N')."""
    out: dict[int, float] = {}
    current = None
    for line in text.splitlines():
        found = VALIDATION.search(line)
        if found:
            current = int(found.group(1))
            continue
        found = ACCURACY.search(line)
        if found and current is not None and current not in out:
            out[current] = float(found.group(1))
    return out


def parse_packs(text: str) -> dict[str, dict[int, float]]:
    """{pack: {iteration: Accuracy-Flip}} from a train log, every pack of each validation."""
    out: dict[str, dict[int, float]] = {}
    current, pack = None, None
    for line in text.splitlines():
        if found := VALIDATION.search(line):
            current, pack = int(found.group(1)), None
        elif found := PACK.search(line):
            pack = found.group(1)
        elif (found := ACCURACY.search(line)) and current is not None and pack is not None:
            out.setdefault(pack, {}).setdefault(current, float(found.group(1)))
    return out


def noisy_pack(cache_dir: Path) -> Path:
    """The noisy synthetic pack (written once; its name spells its settings)."""
    name = "noisy_" + "_".join(f"{k.split('-')[0]}{v}" for k, v in NOISY_PACK.items())
    path = cache_dir / name
    if not (path / "noise.json").is_file():
        cmd = [sys.executable, "-m", "megaface", "pack", "synthetic", "--output", str(path), "--force",
               *[a for k, v in NOISY_PACK.items() for a in (f"--{k}", str(v))]]
        subprocess.run(cmd, check=True, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL)
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def command(arm: str, seed: int, max_steps: int, output: Path, cache_dir: Path, config: Path,
            data_path: Path | None = None) -> list[str]:
    overrides = ARMS[arm] or []
    extra = overrides if arm in FROM_DEFAULTS else SEED_BEHAVIOUR + overrides
    if arm in NOISY_ARMS:  # the noisy pack (or its cleaned copy); validation on its clean and degraded pairs
        pack = noisy_pack(cache_dir)
        bins = json.dumps([str(pack / "val.bin"), str(pack / "val_lq.bin")])
        extra = ["--data.source=recordio", f"--data.path={data_path or pack}", f"--validation.bins={bins}",
                 *extra]
    return ["nice", "-n", "19", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(_free_port()), "-m", "megaface", "train", "--config", str(config),
            "--output", str(output), "--max-steps", str(max_steps), f"--data.cache_dir={cache_dir}",
            f"--train.seed={seed}", f"--data.seed={seed}", "--validation.interval=50", "--train.save_every=0",
            "--train.tensorboard=false", "--train.progress=off", *extra]


def _logged(runs: Path, arm: str, seed: int) -> Any:
    """Accuracies from every log of (arm, seed): a run extended by resuming writes one log per leg.
    {iteration: acc} (the first pack), or {pack: {iteration: acc}} for the noisy arms."""
    out: dict = {}
    for log in sorted(runs.glob(f"{arm}_s{seed}_n*.log")):
        if arm in NOISY_ARMS:
            for pack, accs in parse_packs(log.read_text()).items():
                out.setdefault(pack, {}).update(accs)
        else:
            out.update(parse_log(log.read_text()))
    return out


def _upto(found: dict, max_steps: int) -> dict:
    if found and isinstance(next(iter(found.values())), dict):
        return {pack: _upto(accs, max_steps) for pack, accs in found.items()}
    return {k: v for k, v in found.items() if k <= max_steps}


def _last(found: dict) -> int:
    if found and isinstance(next(iter(found.values())), dict):
        return min((_last(accs) for accs in found.values()), default=0)
    return max(found, default=0)


def _clean_first(seed: int, args: argparse.Namespace, log: Path) -> Path | None:
    """`megaface clean` on the noisy pack with noisy_subcenter3's model of this seed and length; None when it
    fails (e.g. nothing within the threshold after a short run: its one-line error is in the log)."""
    source = Path(args.runs_dir) / f"{CLEAN_SOURCE_ARM}_s{seed}"
    latest = source / "checkpoints" / "latest"
    if not latest.is_file() or latest.read_text().strip() != f"step_{args.max_steps:08d}":
        raise SystemExit(f"arm {CLEAN_ARM} needs {CLEAN_SOURCE_ARM} trained to --max-steps {args.max_steps} "
                         f"for seed {seed} (not found under {source}): run both arms")
    cleaned = Path(args.runs_dir) / f"{CLEAN_ARM}_s{seed}_n{args.max_steps}_pack"
    cmd = ["nice", "-n", "19", sys.executable, "-m", "megaface", "clean", "--checkpoint", str(source), "--pack",
           str(noisy_pack(Path(args.cache_dir))), "--output", str(cleaned), "--force", "--batch-size", "100"]
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("# " + " ".join(cmd) + "\n")
        fh.flush()
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=_env())
    if code != 0:
        print(f"# {CLEAN_ARM} seed {seed}: megaface clean exit {code}, no retraining ({log})", file=sys.stderr,
              flush=True)
        return None
    return cleaned


def run_one(arm: str, seed: int, args: argparse.Namespace) -> dict[int, float]:
    """Train (arm, seed) to --max-steps and parse its accuracies. With --reuse, logs that already reach
    max_steps answer without training, and a shorter finished run is extended from its last checkpoint
    (exact: the schedule's milestones are fixed, the resume restores optimizer, sampler and loader)."""
    runs = Path(args.runs_dir)
    output = runs / f"{arm}_s{seed}"
    done = _logged(runs, arm, seed) if args.reuse or args.report_only else {}
    if _last(done) >= args.max_steps or args.report_only:
        return _upto(done, args.max_steps)
    full_length = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))["train"]["max_steps"]
    if arm in FULL_LENGTH_ONLY and args.max_steps != full_length:
        raise SystemExit(f"arm {arm} only runs at --max-steps {full_length} ({Path(args.config).name}'s "
                         "train.max_steps: its schedule depends on the run length)")
    log = runs / f"{arm}_s{seed}_n{args.max_steps}.log"
    data_path = None
    if arm == CLEAN_ARM:  # a new cleaned pack for this length: train from scratch, never extend
        data_path = _clean_first(seed, args, log)
        if data_path is None:
            return {}
        output = runs / f"{arm}_s{seed}_n{args.max_steps}"
    cmd = command(arm, seed, args.max_steps, output, Path(args.cache_dir), Path(args.config), data_path)
    if args.reuse and (output / "checkpoints").is_dir():
        cmd.append("--train.resume=latest")
    env = _env()
    started = time.time()
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("# " + " ".join(cmd) + "\n")
        fh.flush()
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    print(f"# {arm} seed {seed}: exit {code} after {time.time() - started:.0f} s ({log})", file=sys.stderr,
          flush=True)
    return _upto(_logged(runs, arm, seed), args.max_steps)


def summarise(arm: str, seeds: list[int], results: list[dict[int, float]], max_steps: int,
              at: list[int]) -> dict:
    acc, per_seed = {}, {}
    for step in at:
        values = [r[step] for r in results if step in r]
        if len(values) < len(results):  # report-only: say which seeds this mean covers
            per_seed[f"{step}_seeds"] = [s for s, r in zip(seeds, results, strict=False) if step in r]
        if not values:
            continue
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        acc[str(step)] = [round(statistics.fmean(values), 4), round(spread, 4)]
        per_seed[str(step)] = values
    shipped = f"({QUICKSTART.name} as shipped)"
    overrides = ARMS[arm] if arm not in FROM_DEFAULTS else [shipped, *(ARMS[arm] or [])]
    return {"arm": arm, "overrides": overrides,
            "seeds": seeds, "max_steps": max_steps, "acc": acc, "per_seed": per_seed}


def summarise_noisy(arm: str, seeds: list[int], results: list[dict], max_steps: int, at: list[int],
                    runs: Path) -> dict:
    """A noisy arm's line: the summary per validation pack (val: clean pairs, val_lq: degraded pairs)."""
    packs = sorted({pack for r in results for pack in r})
    per_pack = {pack: summarise(arm, seeds, [r.get(pack, {}) for r in results], max_steps, at) for pack in packs}
    line = {"arm": arm, "overrides": per_pack[packs[0]]["overrides"] if packs else ARMS[arm], "seeds": seeds,
            "max_steps": max_steps, "acc": {p: v["acc"] for p, v in per_pack.items()},
            "per_seed": {p: v["per_seed"] for p, v in per_pack.items()}}
    if arm == CLEAN_ARM:  # what the cleaning dropped, per seed
        reports = [runs / f"{CLEAN_ARM}_s{s}_n{max_steps}_pack" / "clean.json" for s in seeds]
        line["clean"] = [{k: v for k, v in json.loads(r.read_text()).items()
                          if k in ("samples_in", "samples_out", "classes_out", "noise")} if r.is_file() else None
                         for r in reports]
    return line


def table(lines: list[dict], max_steps: int) -> str:
    """The noisy arms' final Accuracy-Flip as a markdown table (mean +- sample std over the seeds)."""
    def cell(line: dict, pack: str) -> str:
        value = line["acc"].get(pack, {}).get(str(max_steps))
        return f"{value[0]:.4f} +- {value[1]:.4f}" if value else "-"
    rows = ["| arm | seeds | clean pairs (val) | low-quality pairs (val_lq) |", "|---|---|---|---|"]
    rows += [f"| {line['arm']} | {len(line['seeds'])} | {cell(line, 'val')} | {cell(line, 'val_lq')} |"
             for line in lines]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default="seed,straight_through,clip_backbone_5,backbone_init_arcface_torch",
                        help=f"comma list of {list(ARMS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma list of seeds (train.seed = data.seed = S)")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--at", default="50,100,200,300", help="iterations to report")
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time (each takes 2 processes)")
    parser.add_argument("--config", default=str(QUICKSTART))
    parser.add_argument("--cache-dir", default="/tmp/megaface-learning/cache")
    parser.add_argument("--runs-dir", default="/tmp/megaface-learning/runs")
    parser.add_argument("--reuse", action="store_true", help="parse finished logs instead of training again")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: summarise the logs already under --runs-dir (missing seeds left out)")
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    at = sorted({int(s) for s in args.at.split(",") if s and int(s) <= args.max_steps} | {args.max_steps})
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
    # the cleaning arm needs noisy_subcenter3's model of the same seed: its runs go second
    jobs = [(arm, seed) for arm in arms for seed in seeds if arm != CLEAN_ARM]
    later = [(arm, seed) for arm in arms for seed in seeds if arm == CLEAN_ARM]
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        results = list(pool.map(lambda job: run_one(*job, args), jobs))
        results += list(pool.map(lambda job: run_one(*job, args), later))
    jobs += later
    noisy = []
    for arm in arms:
        mine = [r for (a, _), r in zip(jobs, results, strict=True) if a == arm]
        if arm in NOISY_ARMS:
            noisy.append(summarise_noisy(arm, seeds, mine, args.max_steps, at, Path(args.runs_dir)))
            print(json.dumps(noisy[-1]), flush=True)
        else:
            print(json.dumps(summarise(arm, seeds, mine, args.max_steps, at)), flush=True)
    if noisy:
        print(table(noisy, args.max_steps), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
