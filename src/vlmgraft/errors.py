"""One exception type for problems a user can fix; the CLI prints its message without a stack trace."""


class VlmgraftError(Exception):
    """A user-facing error: the message names the file, field or id at fault and what to do about it."""
