"""The one exception type for problems with what the user gave us (files, configs, paths)."""


class UserError(Exception):
    """Bad input: the message is one line naming the file, row, field and what was expected.

    Entry points (``python -m ith_jax.*``) print ``error: <message>`` to stderr and exit with status 2.
    """
