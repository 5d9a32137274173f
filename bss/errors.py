"""User-facing errors.

Every problem a user can fix (bad input, bad config, missing dataset) is raised as a
:class:`BSSError` whose message names the file or key and says what to do. Drivers catch it
and print one line instead of a traceback.
"""


class BSSError(Exception):
    """A problem with the user's input that they can fix; the message says how."""


class ConfigError(BSSError):
    """A config file or search space is invalid (unknown key, wrong type, bad value)."""


class DatasetError(BSSError):
    """A dataset folder is missing, empty, or holds a file that cannot be used."""


def suggest(word: str, valid, otherwise: str | None = "Valid", cutoff: float = 0.6) -> str:
    """The did-you-mean tail of an error: ``" Did you mean 'x'?"`` for a close match, else
    ``" <otherwise>: a, b, c."`` (``otherwise=None``: nothing, for lists too long to print)."""
    import difflib

    valid = [str(v) for v in valid]
    close = difflib.get_close_matches(str(word), valid, n=1, cutoff=cutoff)
    if close:
        return f" Did you mean '{close[0]}'?"
    return f" {otherwise}: {', '.join(valid)}." if otherwise else ""


def yaml_problem(path, exc: Exception) -> str:
    """One line for a PyYAML error in the file ``path``: where (line and column, from 1), what, and
    for a tab how to fix it; never PyYAML's multi-line text."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or (str(exc).strip().splitlines() or ["unreadable"])[0]
    context = getattr(exc, "context", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    text = f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")
    if "'\\t'" in problem:
        text += "; YAML indents with spaces, never tabs: replace the tab with spaces"
    return text + "."
