"""Stopping a run on SIGINT or SIGTERM: every rank finishes the step, checkpoints it, and exits.

A signal only records itself (:class:`StopSignals`). After each step (its evaluation and
checkpoint included) every rank puts what it received into one uncounted int32
max-allreduce (:meth:`~mpiqsgd.transport.Transport.agree_max`), so all ranks learn after the
same step that some rank was signalled, however many the signal reached (Ctrl-C under
Hydra's mpiexec and SLURM's SIGTERM reach every rank, ``kill`` one). No rank can wait
forever for the others: each takes part in the same allreduce after the same step, and a
rank that died is caught by ``--comm-timeout`` like any other wait. Simulated workers
(threads) agree the same way over their :class:`~mpiqsgd.transport.LocalGroup`.

Then every rank checkpoints that step, rank 0 writes ``summary.json`` with ``"status":
"interrupted"`` and ``"interrupted_at_step"``, and every rank raises
:class:`~mpiqsgd.errors.Interrupted` (exit status 128 + the signal: 130 for SIGINT, 143 for
SIGTERM), rank 0 with the one line to say: where the checkpoint is and the command that
continues the run.

A second signal at least ``FORCE_AFTER_SECONDS`` after the first ends the process at once
(the signal's default action): the way out of a step that does not end. A terminal's Ctrl-C
under mpiexec reaches each rank twice within milliseconds (the terminal's and mpiexec's
forward), which counts as one.
"""

import os
import shlex
import signal
import threading
import time

from ..errors import Interrupted

__all__ = ["StopSignals", "resume_command", "SIGNALS", "FORCE_AFTER_SECONDS"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)
FORCE_AFTER_SECONDS = 1.0


class StopSignals:
    """Context manager: while inside, SIGINT and SIGTERM ask the run to stop after the current step.

    Handlers are installed from the main thread only (Python delivers signals there); elsewhere
    the context does nothing and signals keep their handlers. The previous handlers come back
    on exit.

    Attributes:
        received: the first signal this process received (0: none).
        agreed: the signal every rank agreed to stop for (0: none yet).
        step, total_steps: where the run stopped, set by the worker that stops.
    """

    def __init__(self):
        self.received, self.agreed = 0, 0
        self.step = self.total_steps = None
        self._first_seconds = None
        self._saved = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved = {}

    def _handle(self, signum, frame):
        now = time.monotonic()
        if not self.received:
            self.received, self._first_seconds = signum, now
        elif now - self._first_seconds >= FORCE_AFTER_SECONDS:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def agree(self, transport):
        """Collective: the signal any rank received (the largest number), 0 when none; remembered."""
        self.agreed = transport.agree_max(self.received)
        return self.agreed

    def interrupted(self, run_dir, command, summary=None):
        """The :class:`Interrupted` to raise once every rank has stopped (``command``: None on the silent ranks)."""
        name = signal.Signals(self.agreed).name
        line = "" if command is None else (
            f"mpiqsgd: stopped by {name} after step {self.step} of {self.total_steps}; checkpoint in "
            f"{run_dir}/checkpoints; continue with: {command}")
        return Interrupted(line, self.agreed, self.step, summary)


def resume_command(run_dir, world_size, simulated):
    """The command that continues the run in ``run_dir``: its own ``config.json`` and ``--resume``."""
    launcher = f"mpiexec -n {world_size} " if world_size > 1 and not simulated else ""
    run_dir = shlex.quote(str(run_dir))
    return f"{launcher}mpiqsgd train --config {run_dir}/config.json --resume {run_dir}"
