"""The ``mergekit-ext`` command: a thin click layer over the library functions.

Each part of the package (``registry.PARTS``) contributes its click commands in
its ``cli.py``; this file only assembles them.
"""

from __future__ import annotations

import os

import click

from mergekit_ext.output import QUIET_HELP
from mergekit_ext.registry import our_commands

# Errors a user can fix (bad paths, parameters, shapes, a full disk) print as one line;
# MERGEKIT_EXT_DEBUG=1 shows the traceback instead.
_USER_ERRORS = (ValueError, KeyError, OSError, RuntimeError)


def _one_line(text: str) -> str:
    """Multi-line messages (pydantic's) joined, so the error stays one line."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip()) or "failed"


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own (usage errors, --help, Ctrl-C) are already short
        except _USER_ERRORS as error:
            if os.environ.get("MERGEKIT_EXT_DEBUG"):
                raise
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            raise click.ClickException(_one_line(message)) from error
        except Exception as error:  # a bug of ours: still one line, the traceback on request
            if os.environ.get("MERGEKIT_EXT_DEBUG"):
                raise
            raise click.ClickException(
                _one_line(f"{type(error).__name__}: {error} (set MERGEKIT_EXT_DEBUG=1 for the traceback)")
            ) from error


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mergekit-ext")
@click.option(
    "--allow-pickle-code",
    is_flag=True,
    help="Load .bin (pickle) checkpoints even with a torch older than 2.6, whose torch.load "
    "runs any code a pickle holds. Only for checkpoints from a source you trust.",
)
def main(allow_pickle_code: bool = False) -> None:
    """Recent model-merging methods for mergekit, with tools around them.

    The merge methods themselves run in the stock `mergekit-yaml`; these
    commands cover what one mergekit run cannot express.
    """
    if allow_pickle_code:
        os.environ["MERGEKIT_EXT_ALLOW_PICKLE_CODE"] = "1"  # io.ALLOW_PICKLE_ENV (io imports mergekit: not here)


@main.command("methods")
def methods_command() -> None:
    """List this package's merge methods with their parameters and papers."""
    from mergekit_ext.registry import catalog  # a stored table: no torch, no mergekit

    for spec in catalog():
        click.secho(f"{spec['name']}", bold=True, nl=False)
        click.echo(f"  {spec['pretty_name']}  <{spec['reference_url']}>")
        click.echo(f"    base model: {spec['base']}")
        for parameter in spec["parameters"]:
            default = parameter["default"]
            default_text = "required" if default is None else f"default {default}"
            click.echo(f"    {parameter['name']:<14} {parameter['scope']:<9} {default_text:<14} {parameter['description']}")
        click.echo()


for _command in our_commands():
    main.add_command(_command)


# ---------------------------------------------------------------------------
# --quiet and -v on every command, and upstream warnings we cannot fix.

# (category, message regex) of warnings raised by our dependencies, not by anything a user
# or this package can change: transformers 5 deprecations reached through peft and
# lm-eval, numpy deprecations inside lm-eval's metrics.
_UPSTREAM_WARNINGS = (
    (FutureWarning, r".*is_gradient_checkpointing.*"),
    (FutureWarning, r".*torch_dtype.*deprecated.*"),
    (UserWarning, r".*torch_dtype.*deprecated.*"),
    (DeprecationWarning, r".*"),
)


def configure_output(quiet: bool = False, verbose: int = 0) -> None:
    """Warnings, logging and progress bars for one command run (called before the command's body)."""
    import logging
    import sys
    import warnings

    if verbose < 2:  # -vv shows everything, upstream warnings included
        for category, message in _UPSTREAM_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads TQDM_* when first imported (after this)
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        logging.basicConfig(level=logging.ERROR)
    else:
        if not sys.stderr.isatty():  # a log file: a few progress lines per stage, not one per step
            os.environ.setdefault("TQDM_MININTERVAL", "10")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "error")
        logging.basicConfig(level=logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING)


def _output_callback(previous):
    def callback(ctx: click.Context, param: click.Parameter, value):
        state = ctx.meta.setdefault("mergekit_ext.output", {})
        key = "verbose" if param.name in ("verbose", "verbosity") else "quiet"
        state[key] = value
        configure_output(bool(state.get("quiet")), int(state.get("verbose") or 0))
        return previous(ctx, param, value) if previous is not None else value

    return callback


def _add_output_options(command: click.Command) -> None:
    """Give a command --quiet/-q and -v/--verbose where it lacks them; its own options stay as they are."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _add_output_options(sub)
        return
    if hasattr(command, "real"):  # built lazily (merge): mergekit's own --quiet and -v
        return
    names = {param.name for param in command.params}
    for param in command.params:
        if param.name in ("quiet", "verbose", "verbosity"):
            param.callback = _output_callback(param.callback)
    if "quiet" not in names:
        command.params.append(
            click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=_output_callback(None), help=QUIET_HELP)
        )
    if "verbose" not in names and "verbosity" not in names:
        command.params.append(
            click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=_output_callback(None), help="More log output (-vv: debug, upstream warnings included).")
        )


_add_output_options(main)
