"""User-facing errors of the audio sidecar.

Every error about user input (a bad manifest line, a cache made with other settings, a corrupted shard, a
missing checkpoint) raises `AudioGenError` or a subclass with a one-line message that names the file, the
line or row, the field and what was expected.  Entry points (`python -m audio_gen....`) catch it, print
`error: <message>` to stderr and exit with status 2.

This module imports nothing beyond the standard library, so both the torch and the JAX halves can use it.
"""


class AudioGenError(Exception):
    """A one-line, user-facing error of the audio sidecar (bad input, incompatible cache, ...)."""
