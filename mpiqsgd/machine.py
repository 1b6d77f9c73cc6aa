"""What a result was measured on: host, processor, threads, library versions, devices."""

import os
import platform
import sys

import torch

from . import __version__

__all__ = ["machine_info", "default_device", "share_cpus"]


def default_device(rank=0):
    """``cuda:<rank % n_gpus>`` when CUDA is available, else ``cpu``."""
    if torch.cuda.is_available():
        return f"cuda:{rank % torch.cuda.device_count()}"
    return "cpu"


def _cpu_model():
    """The CPU's model name (Linux /proc/cpuinfo), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info(device="cpu"):
    """A JSON-ready description of this process's machine and software."""
    info = {
        "mpiqsgd": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized():
        info["mpi"] = mpi.Get_library_version().strip().splitlines()[0].strip()
        info["world_size"] = mpi.COMM_WORLD.Get_size()
    return info


def share_cpus(local_ranks):
    """Size the codec kernels' thread pool to this process's share of the node's cores.

    ``local_ranks`` processes on one node each get ``cpu_count // local_ranks`` threads (at
    least one): oversubscribed ranks that each spin up a full pool run several times slower.

    Returns:
        the number of threads chosen.
    """
    from .codecs.kernels import set_kernel_threads

    threads = max(1, (os.cpu_count() or 1) // max(1, local_ranks))
    set_kernel_threads(threads)
    return threads
