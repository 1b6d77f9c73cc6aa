"""Several ``mpiqsgd`` commands, one after another, in the ranks of one mpiexec job.

    mpiexec -n N python -m mpi4py tests/mpi/train_runs.py OUT_DIR COMMANDS_JSON

``COMMANDS_JSON`` is a list of argv lists (the words after ``mpiqsgd``). Every rank runs each
command through :func:`mpiqsgd.cli.main`, as ``python -m mpi4py -m mpiqsgd`` would; rank 0 writes
the i-th command's stdout to ``OUT_DIR/i.stdout``. Python, torch and MPI start once for all of
them, not once per command (about 3.5 s of CPU a rank each time). A command that fails aborts the
job, as the command line does. Run by tests/test_mpi_launch.py, which compares each run with a
simulation of it.
"""

import contextlib
import io
import json
import sys
from pathlib import Path

from mpi4py import MPI

from mpiqsgd.cli import main
from mpiqsgd.transport import exit_now

out_dir, commands = Path(sys.argv[1]), json.loads(sys.argv[2])
for i, argv in enumerate(commands):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    if code:
        raise SystemExit(f"command {i} ({' '.join(argv)}) ended with status {code}")
    if MPI.COMM_WORLD.rank == 0:
        (out_dir / f"{i}.stdout").write_text(stdout.getvalue())
exit_now(0)
