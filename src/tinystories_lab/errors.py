"""The one exception type for user mistakes: the CLI prints it as a single line and exits non-zero."""


class UserError(Exception):
    """Something the user can fix (a missing file, a bad name, an unprepared dataset).

    The message says what is wrong and how to fix it; the CLI shows it without a traceback.
    """


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (libraries' messages run over many lines)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__).rstrip(".")
