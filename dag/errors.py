"""Errors the control plane raises to the engine."""


class RankFailure(RuntimeError):
    """A rank raised, died or stopped answering; the message names the rank(s)."""

    def __init__(self, message: str, ranks: list[int], fatal: bool):
        super().__init__(message)
        self.ranks = ranks
        self.fatal = fatal  # True: the transport is unusable; the engine must shut down


class TransportClosed(RuntimeError):
    """A step was sent after shutdown or after a fatal failure."""
