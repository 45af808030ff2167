"""The one exception type a user of the toolkit sees."""


class ToolkitError(Exception):
    """A user-facing error: bad input or an impossible request.

    The CLI prints ``str(error)`` as one line on stderr and exits with code 2;
    anything else that escapes is a bug and keeps its traceback.
    """
