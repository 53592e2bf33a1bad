"""``mergekit-ext merge``: mergekit's own engine with a preflight check and an atomic output.

Stock ``mergekit-yaml`` runs our methods unchanged; this wrapper adds what a
long merge benefits from: every local model path, every parameter name and
every tensor shape is checked (shapes from the safetensors headers) before any
math runs, and the result appears at OUT only when the merge has finished.

The command takes all of ``mergekit-yaml``'s options, which mergekit builds from
its ``MergeOptions`` model in ``mergekit.options`` (a module that imports torch
and transformers). So that ``mergekit-ext --help`` stays fast, the real command
is built the first time ``merge`` itself is used (``_LazyCommand``).
"""

from __future__ import annotations

from typing import Callable, Optional

import click

_HELP = "Run a mergekit YAML like `mergekit-yaml`, checked first and written atomically."


def _build_merge_command() -> click.Command:
    # mergekit's own option set (same flags as mergekit-yaml)
    from mergekit.options import add_merge_options

    @click.command("merge")
    @click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
    @click.argument("out_path", type=click.Path())
    @click.option("--overwrite", is_flag=True, help="Replace OUT_PATH if it exists.")
    @add_merge_options
    def merge_command(merge_options, config_file, out_path, overwrite) -> None:
        """Run a mergekit YAML like `mergekit-yaml`, checked first and written atomically.

        Refused before anything is written: a local model path that does not
        exist, a parameter name the method does not have (with a suggestion),
        a bad parameter value, tensors whose shapes differ between models.
        """
        merge_options.apply_global_options()
        from mergekit_ext.merge.preflight import run

        run(config_file, out_path, merge_options, overwrite=overwrite)
        click.echo(f"wrote {out_path}")

    return merge_command


class _LazyCommand(click.Command):
    """A command listed by name and short help, built by ``build`` when first parsed or invoked."""

    def __init__(self, name: str, build: Callable[[], click.Command], short_help: str) -> None:
        super().__init__(name, help=short_help, short_help=short_help)
        self._build = build
        self._real: Optional[click.Command] = None

    def real(self) -> click.Command:
        if self._real is None:
            self._real = self._build()
        return self._real

    def make_context(self, info_name, args, parent=None, **extra):
        return self.real().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        return self.real().invoke(ctx)

    def get_params(self, ctx):
        return self.real().get_params(ctx)

    def get_help(self, ctx):
        return self.real().get_help(ctx)

    def get_usage(self, ctx):
        return self.real().get_usage(ctx)

    def main(self, *args, **kwargs):
        return self.real().main(*args, **kwargs)


merge_command = _LazyCommand("merge", _build_merge_command, _HELP)


COMMANDS = (merge_command,)
