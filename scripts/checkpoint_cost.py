"""Seconds per checkpoint against seconds per epoch, as ``mpiqsgd train`` writes them, and the
cost of the per-step check for SIGINT/SIGTERM (one int32 max-allreduce) against a step.

    mpiexec -n 4 python scripts/checkpoint_cost.py --model resnet20 --dataset synthetic \\
        --synthetic-size 50000 --max-steps 6 --no-progress

Any ``mpiqsgd train`` flags; the script adds ``--checkpoint-every 1`` and times every step and
every checkpoint of rank 0 (a checkpoint ends in an allgather and a barrier, so it lasts as
long as the slowest rank's write). ``--synthetic-size 50000`` holds out 5,000 images as
CIFAR-10 does, so an epoch has as many steps as a CIFAR-10 epoch. Rank 0 prints one JSON
line: the medians (the first step, which compiles kernels, left out) and the checkpoint's
share of an epoch (steps per epoch x the median step), and the median stop check against a step.
"""

import json
import statistics
import sys
import time

from mpiqsgd.cli import main
from mpiqsgd.train import driver

seconds = {"step": [], "checkpoint": [], "stop_requested": []}
shape = {}


def timed(name, method):
    def wrapper(self, *args):
        start = time.perf_counter()
        result = method(self, *args)
        if self.rank == 0:
            seconds[name].append(time.perf_counter() - start)
            shape.update(steps_per_epoch=self.steps_per_epoch, n_ranks=self.n, model=self.cfg.model,
                         batch_size=self.cfg.batch_size)
        return result
    return wrapper


driver.Worker.step = timed("step", driver.Worker.step)
driver.Worker.checkpoint = timed("checkpoint", driver.Worker.checkpoint)
driver.Worker.stop_requested = timed("stop_requested", driver.Worker.stop_requested)
code = main(["train", *sys.argv[1:], "--checkpoint-every", "1"])
if seconds["checkpoint"]:
    step, checkpoint = statistics.median(seconds["step"][1:]), statistics.median(seconds["checkpoint"])
    epoch = step * shape["steps_per_epoch"]
    print(json.dumps({**shape, "step_seconds": round(step, 4), "checkpoint_seconds": round(checkpoint, 4),
                      "epoch_seconds": round(epoch, 2), "checkpoint_vs_epoch": round(checkpoint / epoch, 5),
                      "checkpoints_timed": len(seconds["checkpoint"]),
                      "stop_check_seconds": statistics.median(seconds["stop_requested"]),
                      "stop_check_vs_step": statistics.median(seconds["stop_requested"]) / step}), flush=True)
sys.exit(code)
