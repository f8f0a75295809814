"""The ``knnlm`` command line: thin Typer wrappers that parse, call the library and print.

Each command module declares its commands in a ``COMMANDS`` table, from which ``commands``
builds the app and its groups; shared options are in ``common``. Usage errors print click's
usual text; every other error a user can cause (``KnnlmError``) becomes one ``Error: ...``
line on stderr; both exit with code 2.
"""

from __future__ import annotations

import errno
import logging
import sys

import typer

from knnlm.errors import KnnlmError


def _plain_flags(params: list) -> list:
    """On/off flags show no ``<bool>`` type in --help (they take no value)."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class Command(typer.core.TyperCommand):
    """A command whose --help lists flags without a type."""

    def get_params(self, ctx):  # noqa: ANN001, ANN201 (click's signature)
        return _plain_flags(super().get_params(ctx))


class Group(typer.core.TyperGroup):
    """A group whose --help lists flags without a type."""

    def get_params(self, ctx):  # noqa: ANN001, ANN201
        return _plain_flags(super().get_params(ctx))


app = typer.Typer(
    cls=Group,
    name="knnlm",
    help="Nearest-neighbour language models and the analyses of Chiang et al. (NAACL 2024).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(show: bool) -> None:
    if show:
        from knnlm import __version__

        typer.echo(f"knnlm {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Nearest-neighbour language models and the analyses of Chiang et al. (NAACL 2024)."""


_registered = False

# OS errors a user's paths or machine cause (not bugs): one line, like a KnnlmError.
USER_OS_ERRORS = {errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT,
                  errno.EROFS, errno.ELOOP, errno.ENOTDIR, errno.EISDIR}  # fmt: skip


def error_line(exc: BaseException) -> str | None:
    """The one line a user-caused error prints (after "Error: "), or None for a bug."""
    if isinstance(exc, KnnlmError):
        # One line even when a library's message inside it spans several (transformers' are).
        return " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.errno in USER_OS_ERRORS:
        name = str(exc.filename or "")
        name = name if len(name) <= 200 else name[:100] + "..." + name[-40:]
        return f"{exc.strerror}: {name}" if name else str(exc.strerror)
    return None


def register_all() -> None:
    """Add every command module's commands to ``app`` (once; cheap: no heavy imports)."""
    global _registered
    if _registered:
        return
    from knnlm.cli import commands

    commands.register(app)
    _registered = True


class _StderrLines(logging.Handler):
    """The library's log records (``knnlm.*``) as "warning: ..." lines on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(f"{record.levelname.lower()}: {record.getMessage()}", err=True)


def _log_to_stderr() -> None:
    logger = logging.getLogger("knnlm")
    if not any(isinstance(h, _StderrLines) for h in logger.handlers):
        logger.addHandler(_StderrLines(logging.WARNING))


def _click_errors() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(usage/click errors, exits, aborts) of both the click Typer vendors and plain click.

    Typer >= 0.2x raises its own copy (``typer._click``); plugins or older Typer raise click's.
    """
    errors: list[type] = []
    exits: list[type] = [typer.Exit]
    aborts: list[type] = [typer.Abort]
    try:
        from typer._click import exceptions as vendored

        errors.append(vendored.ClickException)  # its Exit / Abort are typer.Exit / typer.Abort
    except ImportError:  # Typer without a vendored click
        pass
    try:
        import click

        errors.append(click.ClickException)
        exits.append(click.exceptions.Exit)
        aborts.append(click.Abort)
    except ImportError:
        pass
    return tuple(errors), tuple(exits), tuple(aborts)


# Optional parts of the install: a missing module -> the extra that brings it.
EXTRAS = {
    "faiss": "faiss",
    "peft": "lora",
    "datasets": "hf",
    "matplotlib": "report",
    "markdown_it": "report",
    "tiktoken": "tiktoken",
}


def _missing_extra(exc: ModuleNotFoundError) -> str | None:
    root = (exc.name or "").split(".")[0]
    if root not in EXTRAS:
        return None
    hint = " (GPU: or faiss-gpu)" if root == "faiss" else ""
    return f"this needs the {root!r} package: pip install 'knnlm[{EXTRAS[root]}]'{hint}"


def _interrupted() -> None:
    typer.echo("interrupted; rerun the same command to resume where supported", err=True)
    sys.exit(130)


def _plain_message(exc: Exception) -> None:
    """Typer checks option values through pydantic, whose messages start with "Value error, ":
    the user reads only what was wrong."""
    message = getattr(exc, "message", None)
    if isinstance(message, str):
        exc.message = message.replace("Value error, ", "")


def main() -> None:
    """Entry point: usage errors print click's usual text and exit 2; a ``KnnlmError`` (or an OS
    error of the user's paths or machine: name too long, no permission, disk full) prints one
    line and exits 2; anything else is a bug and keeps its traceback."""
    register_all()
    _log_to_stderr()
    errors, exits, aborts = _click_errors()
    try:
        code = app(standalone_mode=False)
    except (KnnlmError, OSError) as exc:
        line = error_line(exc)
        if line is None:
            raise
        typer.secho(f"Error: {line}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except ModuleNotFoundError as exc:
        message = _missing_extra(exc)
        if message is None:
            raise
        typer.secho(f"Error: {message}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted()
    except exits as exc:
        sys.exit(exc.exit_code)
    except aborts:
        typer.echo("Aborted!", err=True)
        sys.exit(1)
    except errors as exc:
        _plain_message(exc)
        exc.show()  # "Usage: ... Try '... --help' ... Error: ..." (exit 2 for usage errors)
        sys.exit(exc.exit_code)
    # Non-standalone mode returns the code of an explicit Exit (e.g. --help) instead of raising,
    # and a Ctrl-C as code 130.
    if code == 130:
        _interrupted()
    sys.exit(code if isinstance(code, int) else 0)
