"""User-facing errors.

Anything raised as :class:`UsageError` is the user's to fix (bad recipe key, missing file,
out-of-range value). The command line prints its message and exits with code 2, without a
traceback; everything else is a bug and keeps its traceback.
"""


class UsageError(Exception):
    """Bad input: the message names the problem and the fix."""
