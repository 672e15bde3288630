"""benchmarks/input_path.py: what it reads off a train log and how it sums up the two paths."""

from __future__ import annotations

import pytest

from benchmarks import input_path

LOG = ("start-up: 3.1 s to the first step (world size 2, ZeRO-0, fp32, 200 iterations, global batch 64, 200 "
       "classes, head model-parallel)\ntrain: iter 19, loss 23.8, throughput: 68.2, avg throughput: 69.1, lr 0.1\n"
       "train: iter 39, loss 22.5, throughput: 69.0, avg throughput: 68.5, lr 0.1\nAccuracy-Flip: 0.86500+-0.02\n"
       "Accuracy-Flip: 0.93000+-0.01\n")


def test_parse_reads_the_run_length_losses_throughput_and_accuracies() -> None:
    found = input_path.parse(LOG)
    assert found == {"iterations": 200, "global_batch": 64, "losses": {19: 23.8, 39: 22.5}, "avg_throughput": 68.5,
                     "accuracies": [0.865, 0.93]}
    with pytest.raises(ValueError, match="no start-up line"):
        input_path.parse("Traceback (most recent call last):\n")


def test_summary_pairs_the_paths_seed_by_seed() -> None:
    def run(path: str, seed: int, speed: float, acc: float, loss: float) -> dict:
        return {"path": path, "seed": seed, "samples_per_cpu_s": speed, "accuracy": acc, "losses": {19: loss}}

    runs = [run("device", 0, 12.0, 0.93, 1.0), run("host", 0, 10.0, 0.93, 1.0),
            run("host", 1, 10.0, 0.91, 2.0), run("device", 1, 11.0, 0.92, 2.5)]
    line = input_path.summarise(runs, [0, 1], "q.yaml")
    assert line["ratios"] == [1.2, 1.1] and line["ratio_device_over_host"] == pytest.approx(1.15)
    assert line["samples_per_cpu_s"] == {"device": 11.5, "host": 10.0}
    assert line["accuracy"]["device"][0] == pytest.approx(0.925) and line["same_losses"] == [True, False]
