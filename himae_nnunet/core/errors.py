"""One base class for every error a user can fix; the CLI prints its message alone, no traceback."""


class UserError(Exception):
    """Bad input or environment: the message names the file or option and says what to do."""
