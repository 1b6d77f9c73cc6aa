"""mpiqsgd: quantized data-parallel SGD over MPI with exact byte accounting."""

__version__ = "0.1.0"
