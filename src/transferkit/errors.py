"""The one error class meant for users: what was wrong, where, and what to do."""


class TransferKitError(Exception):
    """An error the user can fix. The CLI prints its message on one line, without a traceback."""


def yaml_error(path, exc: Exception, hint: str = "fix the YAML syntax") -> TransferKitError:
    """A YAML parser error (several lines, with a caret) as one line: file:line: problem; hint."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark else str(path)
    problem = getattr(exc, "problem", None) or "invalid YAML"
    return TransferKitError(f"{where}: {problem}; {hint}")
