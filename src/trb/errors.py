"""The base of every error `trb` reports to a user as one line (bad config, data, paths, models, numerics), the
errors of configs, paths and data files, and the one check that validated configs (`trb.config`, the methods, the
miniature's presets) make of their values."""


class TrbError(ValueError):
    """An input or state problem the user can fix; the message names the problem and the fix."""


class ConfigError(TrbError):
    """A config that cannot run as written; the message names the key and the fix."""


class PathError(TrbError):
    """A path a command or config names that is missing or of the wrong kind; the message names the option or key."""


class DataError(TrbError):
    """A problem file that cannot be read; the message names the file and the line."""


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ok."""
    if not ok:
        raise ConfigError(message)
