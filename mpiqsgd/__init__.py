"""mpiqsgd: quantized data-parallel SGD over MPI with exact byte accounting.

The public API for a user's own PyTorch loop (docs/pytorch.md): :func:`make_codec`,
:class:`GradientExchange` and :class:`DistributedOptimizer` over an MPI :func:`world`
transport, or :class:`MpiqsgdState` and :func:`mpiqsgd_hook` for torch DDP.

The names load on first use (PEP 562), not at ``import mpiqsgd``: a process that needs only
a module without torch, such as the launcher that ``mpiqsgd cluster`` runs on every node of a
job (:mod:`mpiqsgd.cluster`), starts in a tenth of a second instead of two.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_HOMES = {
    "make_codec": ".codecs",
    "MpiqsgdState": ".ddp", "mpiqsgd_hook": ".ddp",
    "ConfigError": ".errors", "MpiqsgdError": ".errors", "NonFiniteError": ".errors",
    "DistributedOptimizer": ".exchange", "GradientExchange": ".exchange", "broadcast_parameters": ".exchange",
    "LocalGroup": ".transport", "world": ".transport",
}

__all__ = ["make_codec", "GradientExchange", "DistributedOptimizer", "broadcast_parameters", "world", "LocalGroup",
           "MpiqsgdState", "mpiqsgd_hook", "ConfigError", "MpiqsgdError", "NonFiniteError", "__version__"]

if TYPE_CHECKING:
    from .codecs import make_codec
    from .ddp import MpiqsgdState, mpiqsgd_hook
    from .errors import ConfigError, MpiqsgdError, NonFiniteError
    from .exchange import DistributedOptimizer, GradientExchange, broadcast_parameters
    from .transport import LocalGroup, world


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'mpiqsgd' has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
