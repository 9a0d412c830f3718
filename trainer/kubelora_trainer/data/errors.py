"""The one exception the data pipeline raises for problems in the user's data or data settings.

Why a dedicated type: the CLI and the operator catch it and show its message as a single line (a
pod's termination message, a CLI error), so every message names the file, line, field or setting
to fix and never spans lines. It subclasses ValueError so generic callers still treat it as bad input.
"""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the training data or the data settings, described in one specific line."""

    def __init__(self, message: str) -> None:
        # Collapse any newline that slipped in (e.g. from a library's error text) to keep one line.
        super().__init__(" ".join(str(message).split()))
