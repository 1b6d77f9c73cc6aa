"""Exceptions raised by mpiqsgd."""

__all__ = ["MpiqsgdError", "ConfigError", "DecodeError", "NonFiniteError", "CommTimeout", "StopJob", "Interrupted"]


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


class StopJob(MpiqsgdError):
    """Every rank ends the job on purpose and together, with ``exit_code``: not an abort, no rank is left
    waiting. The message is the whole line to say, given on one rank (empty on the others).
    """

    def __init__(self, message="", exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(StopJob):
    """SIGINT or SIGTERM stopped a run after every rank checkpointed the same step.

    Attributes:
        signum: the signal; ``exit_code`` is 128 + signum (130 for SIGINT, 143 for SIGTERM).
        step: the step the checkpoint holds.
        summary: rank 0's ``summary.json`` contents (None on other ranks).
    """

    def __init__(self, message, signum, step, summary=None):
        super().__init__(message, 128 + signum)
        self.signum, self.step, self.summary = signum, step, summary
