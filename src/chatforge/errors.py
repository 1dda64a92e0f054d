"""The one error a user mistake raises. The CLI prints its message (no stack trace) and exits 2."""


class ChatforgeError(Exception):
    """A problem the user can fix: the message names the file, line or key, and the fix."""
