"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""


class BppError(Exception):
    """A problem with the user's input or environment, with a message saying what to do."""


def missing_dependency(package: str, purpose: str, pip_name: str | None = None) -> BppError:
    return BppError(f"{purpose} needs the package {package!r}: pip install {pip_name or package}")
