"""The ``knnlm`` command line: thin Typer wrappers that parse, call the library and print.

Each command group lives in its own module with a ``register(app)`` function; errors a user
can cause (``KnnlmError``) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

import typer

from knnlm.errors import KnnlmError

app = typer.Typer(
    name="knnlm",
    help="Nearest-neighbour language models and the analyses of Chiang et al. (NAACL 2024).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


_registered = False


def _register_all() -> None:
    global _registered
    if _registered:
        return
    from knnlm.cli import commands

    for module in commands.MODULES:
        module.register(app)
    _registered = True


def main() -> None:
    _register_all()
    try:
        app(standalone_mode=False)
    except KnnlmError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume where supported", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
