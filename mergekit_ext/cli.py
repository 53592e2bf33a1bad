"""The ``mergekit-ext`` command: a thin click layer over the library functions.

Each feature module contributes its own click command or group; this file only
assembles them, so ``mergekit-ext --help`` starts fast (heavy imports happen
inside commands).
"""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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


def _add_feature_commands() -> None:
    # One line per feature module; each exposes a click command or group.
    from mergekit_ext.rmm_cli import lora_group, rmm_group

    main.add_command(rmm_group)
    main.add_command(lora_group)


_add_feature_commands()
