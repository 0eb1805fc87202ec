"""User-facing errors.

Anything raised as :class:`UsageError` is the user's to fix (bad recipe key, missing file,
out-of-range value). The command line prints its message and exits with code 2, without a
traceback; everything else is a bug and keeps its traceback.
"""


class UsageError(Exception):
    """Bad input: the message names the problem and the fix."""


# Renamed recipe keys (old dotted key -> new), accepted with a warning for one release.
RENAMED_RECIPE_KEYS = {"lte.tau": "lte.threshold"}


def warn_deprecated(old: str, new: str) -> None:
    """One release of grace for a renamed key or function: warn (and log, for the CLI) with the new name."""
    import logging
    import warnings

    message = f"{old} is deprecated, use {new}"
    warnings.warn(message, DeprecationWarning, stacklevel=3)
    logging.getLogger("lte").warning(message)


def rename_deprecated_keys(tree, warn: bool = True):
    """Move every old recipe key of ``tree`` (a nested mapping: dict or OmegaConf) to its new name, in place."""
    for old, new in RENAMED_RECIPE_KEYS.items():
        group, old_key = old.split(".")
        new_key = new.split(".")[1]
        section = tree.get(group) if hasattr(tree, "get") else None
        if not hasattr(section, "pop") or old_key not in section:
            continue
        if new_key in section:
            raise UsageError(f"{old} and {new} are both set; keep only {new} ({old} is its deprecated name)")
        section[new_key] = section.pop(old_key)
        if warn:
            warn_deprecated(old, new)
    return tree


def renamed_kwargs(**renames: str):
    """Class decorator: the constructor still takes each old keyword (``old=new``), with a warning, for one release."""
    import functools

    def decorate(cls):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{cls.__name__}: pass {new}= only ({old}= is its deprecated name)")
                    warn_deprecated(f"{cls.__name__}({old}=...)", f"{new}=...")
                    kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        return cls

    return decorate
