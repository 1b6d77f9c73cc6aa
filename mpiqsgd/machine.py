"""What a result was measured on: host, processor, threads, library versions, devices."""

import os
import platform
import sys

import torch

from . import __version__

__all__ = ["machine_info", "default_device"]


def default_device(rank=0):
    """``cuda:<rank % n_gpus>`` when CUDA is available, else ``cpu``."""
    if torch.cuda.is_available():
        return f"cuda:{rank % torch.cuda.device_count()}"
    return "cpu"


def machine_info(device="cpu"):
    """A JSON-ready description of this process's machine and software."""
    info = {
        "mpiqsgd": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
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
