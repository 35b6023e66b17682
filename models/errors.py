"""Errors of the models package that callers translate into their own terms (the service: a backend it can't run)."""


class FusedUnavailableError(RuntimeError):
    """`fuse` cannot run here: the model is not on a CUDA device and the Triton interpreter is off."""
