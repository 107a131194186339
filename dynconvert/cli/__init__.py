"""The ``dynconvert`` command: a thin click shell over the Python API.

``dynconvert MODEL ...`` is the convert command; the other commands are named
(``inspect``, ``finetune``, ``export``, ``bench``). Each command lives in its own module and
is registered in ``_COMMANDS``.

Exit codes: 0 ok, 1 failure, 2 bad usage. Errors are one line; ``--debug`` (anywhere on the
command line) adds the traceback.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import traceback
import warnings
from collections.abc import Iterator
from importlib import import_module

import click

from .. import interrupts
from ..errors import DynconvertError
from ..interrupts import signal_name, sigterm_as_interrupt
from ..ranks import warnings_on_main_only

# name -> "module:attribute" of a click.Command; imported only when that command runs.
_COMMANDS = {
    "convert": "dynconvert.cli.convert_cmd:convert_command",
    "inspect": "dynconvert.cli.inspect_cmd:inspect_command",
    "finetune": "dynconvert.cli.finetune_cmd:finetune_command",
    "export": "dynconvert.cli.export_cmd:export_command",
    "bench": "dynconvert.cli.bench_cmd:bench_command",
}
DEFAULT_COMMAND = "convert"
# Whether an unknown first word is a typo needs timm (seconds to import): the check lives with
# the convert command, which imports timm anyway, and runs only when that word is seen.
_TYPO_CHECK = "dynconvert.cli.convert_cmd:refuse_mistyped_command"
# click >= 8.2 raises this for a group called without arguments (older versions print the help).
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _Group(click.Group):
    """Lazily loaded subcommands; an unknown first word is the MODEL of ``convert``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _COMMANDS:
            return None
        try:
            return _attribute(_COMMANDS[name])
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("dynconvert"):
                return None  # command not built yet
            raise

    def resolve_command(self, ctx: click.Context, args: list[str]):
        if args and args[0] not in _COMMANDS and not args[0].startswith("-"):
            _attribute(_TYPO_CHECK)(ctx, args[0], list(_COMMANDS))
            args = [DEFAULT_COMMAND, *args]
        return super().resolve_command(ctx, args)


def _attribute(target: str):
    """The object that ``"module:attribute"`` names, its module imported now."""
    module, attr = target.split(":")
    return getattr(import_module(module), attr)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="dynconvert")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Convert, fine-tune and export dynamic-convolution models.

    \b
    dynconvert resnet50 --k 4 --out model.pt     convert a timm model and save it
    dynconvert inspect model.pt                  show what was converted
    """
    ctx.obj = {"debug": debug}


def _hoist_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``--debug`` anywhere before ``--`` moves to the front, where the group's option reads it.

    The error lines say "rerun with --debug", and users append it to the command they ran;
    the subcommands themselves have no such option.
    """
    end = argv.index("--") if "--" in argv else len(argv)
    rest = [arg for arg in argv[:end] if arg != "--debug"] + argv[end:]
    debug = len(rest) < len(argv)
    return (["--debug", *rest] if debug else rest), debug


@contextlib.contextmanager
def _plain_warnings(enabled: bool) -> Iterator[None]:
    """Warnings as one ``warning: ...`` line (``--debug`` keeps Python's file and line)."""
    previous = warnings.formatwarning
    if enabled:
        warnings.formatwarning = _warning_line
    try:
        yield
    finally:
        warnings.formatwarning = previous


def _print_traceback(exc: BaseException) -> None:
    """The traceback with every chained exception, also those hidden by ``raise ... from None``:
    under ``--debug`` the root cause is what the user asked to see."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__suppress_context__ = False
        link = link.__cause__ or link.__context__
    traceback.print_exception(exc)


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """A warning as the CLI prints it: ``warning: <message>``, without Python's source line."""
    return f"warning: {message}\n"


def _report_interrupt(exc: BaseException | None) -> int:
    """One line for Ctrl-C or SIGTERM: which outputs are complete, and the exit code.

    A signal that came after the last output was renamed into place interrupted nothing the
    user asked for: the files are saved and complete, so that is what is said, with exit 0.
    """
    name = signal_name(exc) if exc is not None else "SIGINT"
    saved = [str(p) for p in interrupts.written_outputs()]
    if interrupts.all_outputs_written():
        click.echo(f"saved {', '.join(saved)} (complete: the {name} came after the last "
                   "write)", err=True)  # fmt: skip
        return 0
    done = f"; {', '.join(saved)} saved and complete" if saved else ""
    click.echo(f"error: interrupted by {name}{done}", err=True)
    return 128 + getattr(signal, name)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the CLI and maps failures to one line and an exit code."""
    argv, debug = _hoist_debug(list(sys.argv[1:] if argv is None else argv))
    interrupts.reset_outputs()
    try:
        with sigterm_as_interrupt(), warnings_on_main_only(), _plain_warnings(not debug):
            cli.main(args=argv, prog_name="dynconvert", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort as exc:
        # click turns Ctrl-C inside a command into Abort.
        return _report_interrupt(exc.__cause__ or exc.__context__)
    except _NO_ARGS_IS_HELP as exc:  # bare ``dynconvert``: the help itself, not an error line
        exc.show()
        return exc.exit_code
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "dynconvert"
        click.echo(f"error: {exc.format_message()} (see '{where} --help')", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        return exc.exit_code
    except DynconvertError as exc:
        if debug:
            _print_traceback(exc)
        click.echo(f"error: {exc}", err=True)
        return 2 if exc.usage else 1
    except KeyboardInterrupt as exc:
        return _report_interrupt(exc)
    except Exception as exc:  # any other failure is still one line unless --debug
        if debug:
            _print_traceback(exc)
        else:
            click.echo(
                f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                err=True,
            )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
