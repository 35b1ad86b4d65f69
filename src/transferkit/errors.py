"""The one error class meant for users: what was wrong, where, and what to do."""


class TransferKitError(Exception):
    """An error the user can fix. The CLI prints its message on one line, without a traceback."""


def yaml_error(path, exc: Exception, hint: str = "fix the YAML syntax") -> TransferKitError:
    """A YAML parser error (several lines, with a caret) as one line: file:line: problem; hint."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark else str(path)
    problem = getattr(exc, "problem", None) or "invalid YAML"
    return TransferKitError(f"{where}: {problem}; {hint}")


ECHO_LIMIT = 200  # characters of a user's value repeated in an error message


def clip(value: object, limit: int = ECHO_LIMIT) -> str:
    """repr(value), cut to about `limit` characters, saying how much was left out: an error message
    echoes what it refused, and what it refused may be huge."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit:,} more characters)"


def one_line(exc: BaseException, limit: int = ECHO_LIMIT) -> str:
    """An exception's message on one line, cut to `limit` characters (library messages can be
    several lines, or echo a whole input)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."
