"""The error raised for bad use of the late-phase core (one line that says what to do)."""


class LatePhaseError(ValueError):
    """Invalid input or state for late-phase training; the message names the problem and the fix."""
