"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""


class BppError(Exception):
    """A problem with the user's input or environment, with a message saying what to do."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def missing_dependency(package: str, purpose: str, pip_name: str | None = None) -> BppError:
    return BppError(f"{purpose} needs the package {package!r}: pip install {pip_name or package}")
