"""The one error type meshplan raises for an invalid layout."""


class PlanError(ValueError):
    """An invalid parallel layout, raised before any collective starts.

    The message names the offending field, the value it was given and what would be valid, so
    that a user can fix the layout without reading meshplan's source.
    """
