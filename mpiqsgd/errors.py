"""Exceptions raised by mpiqsgd."""

__all__ = ["MpiqsgdError", "ConfigError", "DecodeError", "NonFiniteError", "CommTimeout"]


class MpiqsgdError(Exception):
    """Base class of every error mpiqsgd raises on purpose."""


class ConfigError(MpiqsgdError, ValueError):
    """An invalid parameter, flag or combination of them."""


class DecodeError(MpiqsgdError, ValueError):
    """Bytes that are not a valid mpiqsgd message (truncated, corrupted or foreign)."""


class NonFiniteError(MpiqsgdError, ValueError):
    """A gradient holding NaN or Inf was handed to a codec, a bucket norm would leave the
    float32 range, or an error-feedback residual diverged (the message names which)."""


class CommTimeout(MpiqsgdError):
    """A rank waited longer than ``--comm-timeout`` for a peer: the peer is stopped, hung or gone."""
