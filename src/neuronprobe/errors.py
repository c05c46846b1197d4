"""The one exception type a user should ever see from neuronprobe.

Every check of user input raises :class:`NeuronprobeError` with a message that
names the input and says what to do; the CLI prints that message (no
traceback) and exits with code 2.
"""

from __future__ import annotations

from collections.abc import Iterable


class NeuronprobeError(Exception):
    """Bad input or an unusable environment, explained in one line."""


def check_known_keys(values: Iterable[str], known: Iterable[str], what: str) -> None:
    """Raise :class:`NeuronprobeError` naming any of ``values`` not in ``known``."""
    known = sorted(known)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise NeuronprobeError(f"unknown {what} key(s) {unknown}; known keys are {known}.")
