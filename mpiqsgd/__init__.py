"""mpiqsgd: quantized data-parallel SGD over MPI with exact byte accounting.

The public API for a user's own PyTorch loop (docs/pytorch.md): :func:`make_codec`,
:class:`GradientExchange` and :class:`DistributedOptimizer` over an MPI :func:`world`
transport, or :class:`MpiqsgdState` and :func:`mpiqsgd_hook` for torch DDP.
"""

__version__ = "0.1.0"

from .codecs import make_codec  # noqa: E402
from .ddp import MpiqsgdState, mpiqsgd_hook  # noqa: E402
from .errors import ConfigError, MpiqsgdError, NonFiniteError  # noqa: E402
from .exchange import DistributedOptimizer, GradientExchange, broadcast_parameters  # noqa: E402
from .transport import LocalGroup, world  # noqa: E402

__all__ = ["make_codec", "GradientExchange", "DistributedOptimizer", "broadcast_parameters", "world", "LocalGroup",
           "MpiqsgdState", "mpiqsgd_hook", "ConfigError", "MpiqsgdError", "NonFiniteError", "__version__"]
