"""``mergekit-ext merge``: mergekit's own engine with a preflight check and an atomic output.

Stock ``mergekit-yaml`` runs our methods unchanged; this wrapper adds what a
long merge benefits from: every local model path and every tensor shape is
checked from the safetensors headers before any math runs, and the result
appears at OUT only when the merge has finished.
"""

from __future__ import annotations

import click


def _merge_command():
    # mergekit's own option set (same flags as mergekit-yaml); imported here
    # because building the command needs it.
    from mergekit.options import add_merge_options

    @click.command("merge")
    @click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
    @click.argument("out_path", type=click.Path())
    @click.option("--overwrite", is_flag=True, help="Replace OUT_PATH if it exists.")
    @add_merge_options
    def merge_command(merge_options, config_file, out_path, overwrite) -> None:
        """Run a mergekit YAML like `mergekit-yaml`, checked first and written atomically."""
        merge_options.apply_global_options()
        from mergekit_ext.merge.preflight import run

        run(config_file, out_path, merge_options, overwrite=overwrite)
        click.echo(f"wrote {out_path}")

    return merge_command


merge_command = _merge_command()


COMMANDS = (merge_command,)
