"""The one exception type for mistakes a user can make and fix."""


class UserError(Exception):
    """Bad input from the user: the message is one sentence saying what was wrong and what to do.

    Command lines print it without a traceback and exit with status 2.
    """
