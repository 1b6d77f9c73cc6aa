"""What ``mpiqsgd train`` tells a person: the run directory, a line per epoch, progress, a summary.

Rank 0 alone speaks. Stdout gets the run directory, one line per evaluation (epoch, train
loss, validation accuracy, bytes per step per rank, seconds per step), notes on slow
preparation (data decoding, kernel compilation) and a short summary naming the files and
the ``mpiqsgd report`` command. With ``--json`` stdout is the summary as JSON only and the
lines for people go to stderr. Progress goes to stderr: a tqdm bar on a terminal, else one
plain line every :data:`PROGRESS_EVERY_SECONDS` so that a log file is not flooded.
Numbers carry units and three significant digits (:func:`sig3`).
"""

import contextlib
import json
import math
import sys
import threading
import time

__all__ = ["Console", "Progress", "sig3", "human_bytes", "human_seconds", "PROGRESS_EVERY_SECONDS"]

PROGRESS_EVERY_SECONDS = 30.0  # a log file gets one progress line this often
SLOW_STEP_SECONDS = 2.0  # the first step says it compiles kernels once it has run this long


def sig3(x):
    """``x`` with three significant digits, without exponent: 0.000252, 8.59, 1440, 12300."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    digits = 2 - math.floor(math.log10(abs(x)))
    x = round(x, digits)
    digits = 2 - math.floor(math.log10(abs(x)))  # 9.996 rounds up to 10.0
    return f"{round(x, digits):.{max(digits, 0)}f}"


def human_bytes(n):
    """``12 B``, ``8.59 kB``, ``1.44 MB`` (powers of 1000)."""
    if abs(n) < 999.5:
        return f"{round(n)} B"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 999.5:
            return f"{sig3(n)} {unit}"
        n /= 1000
    return f"{sig3(n)} TB"


def human_seconds(s):
    """``81.2 ms``, ``8.33 s``, ``3.45 min``, ``1.23 h``."""
    if s < 0.9995:
        return f"{sig3(s * 1e3)} ms"
    if s < 99.95:
        return f"{sig3(s)} s"
    if s < 3599.5:
        return f"{sig3(s / 60)} min"
    return f"{sig3(s / 3600)} h"


class Progress:
    """Steps done, on stderr: a tqdm bar on a terminal, else a plain line every ``every`` seconds."""

    def __init__(self, total, initial=0, stream=None, every=PROGRESS_EVERY_SECONDS):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.step, self.every = total, initial, every
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True,
                            file=self.stream)
        self.started = self.last = time.perf_counter()
        self.first = initial

    def update(self, n=1):
        self.step += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            per_step = (now - self.started) / max(1, self.step - self.first)
            left = human_seconds(per_step * (self.total - self.step))
            print(f"step {self.step}/{self.total}, {human_seconds(per_step)}/step, {left} left",
                  file=self.stream, flush=True)

    def postfix(self, **values):
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def write(self, line, stream):
        """Print ``line`` to ``stream`` without breaking the bar."""
        if self.bar is not None:
            self.bar.write(line, file=stream)
        else:
            print(line, file=stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class Console:
    """Rank 0's lines for a person (or, with ``as_json``, JSON on stdout and the lines on stderr).

    Args:
        as_json: print the summary as JSON on stdout, and everything else on stderr.
        out, err: the streams (default: ``sys.stdout``, ``sys.stderr`` at the time of each line).
    """

    def __init__(self, as_json=False, out=None, err=None):
        self.as_json = as_json
        self._out, self._err = out, err
        self.progress = None

    @property
    def err(self):
        return self._err if self._err is not None else sys.stderr

    @property
    def lines(self):
        """Where the lines for a person go."""
        if self.as_json:
            return self.err
        return self._out if self._out is not None else sys.stdout

    def say(self, line):
        """One line for a person (beside the progress bar, if one is shown)."""
        if self.progress is not None:
            self.progress.write(line, self.lines)
        else:
            print(line, file=self.lines, flush=True)

    def run_directory(self, path):
        self.say(f"run directory: {path}")

    def start_progress(self, total, initial=0):
        self.progress = Progress(total, initial, self.err)
        return self.progress

    def step_done(self):
        if self.progress is not None:
            self.progress.update(1)

    def close_progress(self):
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    @contextlib.contextmanager
    def first_step(self, after=SLOW_STEP_SECONDS):
        """Around a process's first step: if it runs past ``after`` seconds, say that kernels compile,
        and when it ends, how long it took."""
        timer = threading.Timer(after, self.say, ("first step: compiling kernels and warming up (numba caches "
                                                  "the kernels for the next runs) ...",))
        timer.daemon = True
        began = time.perf_counter()
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            if time.perf_counter() - began > after:
                self.say(f"first step done in {human_seconds(time.perf_counter() - began)}")

    def evaluation(self, row, epochs, bytes_per_step, seconds_per_step):
        """The line of one evaluation: epoch, train loss, validation accuracy, bytes and seconds per step."""
        epoch = row["epoch"]
        shown = f"{epoch:.0f}" if abs(epoch - round(epoch)) < 1e-9 else f"{epoch:.2f}"
        self.say(f"epoch {shown}/{epochs}  loss {sig3(row['train_loss'])}  val acc {100 * row['val_acc']:.1f}%  "
                 f"{human_bytes(bytes_per_step)}/step/rank  {human_seconds(seconds_per_step)}/step")
        if self.progress is not None:
            self.progress.postfix(loss=sig3(row["train_loss"]), val=f"{100 * row['val_acc']:.1f}%")

    def finish(self, summary, run_dir):
        """The end of a run: the summary as JSON (``as_json``) or a few lines for a person."""
        if self.as_json:
            print(json.dumps(summary, indent=1), flush=True)
            return
        s = summary
        steps, wall = s["steps"], s["wall_seconds"]
        target = ""
        if s.get("target_acc") is not None:
            reached = s.get("seconds_to_target")
            target = (f"; reached {100 * s['target_acc']:.1f}% in {human_seconds(reached)}" if reached is not None
                      else f"; never reached the target {100 * s['target_acc']:.1f}%")
        ratio = s.get("compression_vs_fp32")
        smaller = f", {sig3(ratio)}x smaller than fp32" if ratio else ""
        warm = s.get("warmup_steps")
        first = "the first step" if warm == 1 else f"the first {warm} steps"
        timing = f"; phase timings in summary.json leave out {first} (compilation)" if warm else ""
        lines = [
            f"done: validation accuracy {100 * s['final_val_acc']:.1f}% (best {100 * s['best_val_acc']:.1f}%), "
            f"test {100 * s['test_acc']:.1f}%{target}",
            f"time: {human_seconds(wall)} for {steps} steps ({human_seconds(wall / max(1, steps))}/step){timing}",
            f"communication: {human_bytes(s['bytes_per_step_per_rank'])}/step/rank{smaller} "
            f"({human_bytes(s['total_bytes'])} in all, {s['n_ranks']} ranks)",
            f"files: {run_dir}/ (summary.json, metrics.jsonl, comm.json, config.json)",
            f"report: mpiqsgd report {run_dir}",
        ]
        for line in lines:
            self.say(line)
