"""The ``mergekit-ext`` command: a thin click layer over the library functions.

Each part of the package (``registry.PARTS``) contributes its click commands in
its ``cli.py``; this file only assembles them.
"""

from __future__ import annotations

import os

import click

from mergekit_ext.registry import our_commands

# Errors a user can fix (bad paths, parameters, shapes) print as one line;
# MERGEKIT_EXT_DEBUG=1 shows the traceback instead.
_USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except _USER_ERRORS as error:
            if os.environ.get("MERGEKIT_EXT_DEBUG"):
                raise
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            raise click.ClickException(str(message)) from error


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mergekit-ext")
def main() -> None:
    """Recent model-merging methods for mergekit, with tools around them.

    The merge methods themselves run in the stock `mergekit-yaml`; these
    commands cover what one mergekit run cannot express.
    """


@main.command("methods")
def methods_command() -> None:
    """List this package's merge methods with their parameters and papers."""
    from mergekit_ext.registry import describe_default, our_methods

    for method in our_methods():
        spec = method.spec
        click.secho(f"{spec.name}", bold=True, nl=False)
        click.echo(f"  {spec.pretty_name}  <{spec.reference_url}>")
        click.echo(f"    base model: {spec.contract.base.value}")
        for parameter in spec.parameters:
            scope = "per model" if parameter.scope.value != "shared" else "global"
            default = describe_default(parameter)
            default_text = "required" if default is None else f"default {default}"
            click.echo(f"    {parameter.name:<14} {scope:<9} {default_text:<14} {parameter.description or ''}")
        click.echo()


for _command in our_commands():
    main.add_command(_command)
