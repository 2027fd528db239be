"""The one exception type for user mistakes: the CLI prints it as a single line and exits non-zero."""


class UserError(Exception):
    """Something the user can fix (a missing file, a bad name, an unprepared dataset).

    The message says what is wrong and how to fix it; the CLI shows it without a traceback.
    """
