"""The base of every error `trb` reports to a user as one line (bad config, data, paths, models, numerics)."""


class TrbError(ValueError):
    """An input or state problem the user can fix; the message names the problem and the fix."""
