"""The base of every error a user fixes rather than reports: a bad config, checkpoint, layout,
request or flag. Its message names the field and the fix, so `caravan` prints it alone (exit 2)
instead of a traceback; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """An error whose message is the whole story: what was wrong, and what to do instead."""
