"""The quickstart trained through each input path, same run: accuracy and samples per CPU-second.

    python benchmarks/input_path.py --seeds 0,1,2 [--config launch/configs/quickstart.yaml]

Paths (`data.prepare`):
  device  the default: loader workers hand over uint8 batches; flip and normalisation run on the training device
  host    the former path: the loader's process normalises each batch to float32 and the step copies that

Every run is the real two-rank job, `torchrun --nproc_per_node 2 -m megaface train --config C --data.prepare=P
--train.seed=S --data.seed=S`, validating as the config says. Within a seed the two paths run back to back, the
order alternating from seed to seed, so that a change in the machine's load falls on both. A run's CPU time is
that of torchrun and its ranks together (os.wait4), start-up and validation included: what the whole command
costs. samples_per_cpu_s = iterations x global batch / CPU seconds.

Prints one JSON line per run, then a summary line:
    {"summary": true, "config": ..., "seeds": [...],
     "samples_per_cpu_s": {"device": median, "host": median}, "ratio_device_over_host": median of per-seed
     ratios, "ratios": [...], "accuracy": {"device": [mean, spread], "host": [...]},
     "same_losses": [per seed: the two paths logged identical losses]}
spread = sample standard deviation over the seeds. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script: learning.py's helpers through the benchmarks package
from benchmarks.learning import ACCURACY, _env, _free_port  # noqa: E402

PATHS = ("device", "host")
START = re.compile(r"start-up: .*?(\d+) iterations, global batch (\d+)")
LOSS = re.compile(r"train: iter (\d+), loss ([0-9.e+-]+|nan|inf)")
THROUGHPUT = re.compile(r"avg throughput: ([0-9.]+)")


def parse(text: str) -> dict[str, Any]:
    """iterations and global batch (the start-up line), the logged losses, the last windowed throughput and the
    Accuracy-Flip of every validation, from a train log."""
    start = START.search(text)
    if start is None:
        raise ValueError("no start-up line in the log: the run did not reach its first step")
    throughputs = THROUGHPUT.findall(text)
    return {"iterations": int(start.group(1)), "global_batch": int(start.group(2)),
            "losses": {int(i): float(v) for i, v in LOSS.findall(text)},
            "avg_throughput": float(throughputs[-1]) if throughputs else None,
            "accuracies": [float(a) for a in ACCURACY.findall(text)]}


def run_one(path: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One two-rank quickstart through `path`: its log parsed, plus wall and CPU seconds."""
    output = Path(args.runs_dir) / f"{path}_s{seed}"
    shutil.rmtree(output, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    log = output.parent / f"{path}_s{seed}.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "megaface", "train", "--config", str(args.config), "--output", str(output),
           f"--data.prepare={path}", f"--train.seed={seed}", f"--data.seed={seed}",
           f"--data.cache_dir={args.cache_dir}", "--train.save_every=0", "--train.tensorboard=false",
           "--train.progress=off", *args.override]
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        fh.write("# " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=_env())
        _, status, usage = os.wait4(proc.pid, 0)  # torchrun and the ranks it waited for
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{path} seed {seed}: exit {proc.returncode}; see {log}")
    found = parse(log.read_text(encoding="utf-8"))
    cpu = usage.ru_utime + usage.ru_stime
    samples = found["iterations"] * found["global_batch"]
    return {"path": path, "seed": seed, **found, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "samples": samples, "samples_per_cpu_s": round(samples / cpu, 2),
            "accuracy": found["accuracies"][-1] if found["accuracies"] else None, "log": str(log)}


def _mean_spread(values: list[float]) -> list[float]:
    return [round(statistics.fmean(values), 4), round(statistics.stdev(values), 4) if len(values) > 1 else 0.0]


def summarise(runs: list[dict[str, Any]], seeds: list[int], config: str) -> dict[str, Any]:
    by = {(r["path"], r["seed"]): r for r in runs}
    ratios = [by["device", s]["samples_per_cpu_s"] / by["host", s]["samples_per_cpu_s"] for s in seeds]
    accuracy = {p: [by[p, s]["accuracy"] for s in seeds] for p in PATHS}
    return {"summary": True, "config": config, "seeds": seeds,
            "samples_per_cpu_s": {p: statistics.median(by[p, s]["samples_per_cpu_s"] for s in seeds) for p in PATHS},
            "ratio_device_over_host": round(statistics.median(ratios), 3), "ratios": [round(r, 3) for r in ratios],
            "accuracy": {p: _mean_spread(v) if None not in v else None for p, v in accuracy.items()},
            "same_losses": [by["device", s]["losses"] == by["host", s]["losses"] for s in seeds]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma list (train.seed = data.seed = S)")
    parser.add_argument("--config", default=str(REPO / "launch" / "configs" / "quickstart.yaml"))
    parser.add_argument("--cache-dir", default="/tmp/megaface-input-path/cache")
    parser.add_argument("--runs-dir", default="/tmp/megaface-input-path/runs")
    parser.add_argument("--override", action="append", default=[],
                        help="one more `megaface train` argument for every run (repeatable), written --override=--max-steps=4")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = []
    for i, seed in enumerate(seeds):
        for path in PATHS if i % 2 == 0 else PATHS[::-1]:
            run = run_one(path, seed, args)
            runs.append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "losses"}), flush=True)
    print(json.dumps(summarise(runs, seeds, str(args.config))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
