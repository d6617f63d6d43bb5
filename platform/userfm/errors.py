"""One base class for errors a user can fix (bad input, bad config): the CLI prints them as one line."""


class UserfmError(Exception):
    """Bad input or config; the message names the file, field, row or key."""
