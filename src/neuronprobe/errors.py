"""The one exception type a user should ever see from neuronprobe.

Every check of user input raises :class:`NeuronprobeError` with a message that
names the input and says what to do; the CLI prints that message (no
traceback) and exits with code 2.
"""

from __future__ import annotations


class NeuronprobeError(Exception):
    """Bad input or an unusable environment, explained in one line."""
