"""``mergekit-ext merge``: mergekit's own engine with a preflight check and an atomic output.

Stock ``mergekit-yaml`` runs our methods unchanged; this wrapper adds what a
long merge benefits from: every local model path, every parameter name and
every tensor shape is checked (shapes from the safetensors headers) before any
math runs, and the result appears at OUT only when the merge has finished.

The command takes all of ``mergekit-yaml``'s options. mergekit declares them on
its ``MergeOptions`` model in ``mergekit.options``, a module that imports torch
and transformers (6-10 s). So that ``merge --help`` and every argument error
answer at once, the options are declared from a stored copy of that table
(``merge/options.py``, checked against mergekit by a test), and mergekit is imported only once the
arguments have been read and the config file found.
"""

from __future__ import annotations

from typing import Dict

import click

from mergekit_ext.merge.options import stored_options

# mergekit's flags that get a short form of ours too, so that -q means the same on every command
_SHORT = {"quiet": "-q"}


def _click_option(entry: Dict) -> click.Option:
    """One mergekit option with mergekit's spelling (``mergekit.options.add_merge_options``)."""
    name, kind, default = entry["name"], entry["type"], entry["default"]
    flag = name.replace("_", "-")
    extra: Dict = {}
    if name == "verbosity":
        declarations, extra["count"] = ["-v", "verbosity"], True
    elif name == "gpu_rich":
        declarations, extra["is_flag"] = ["--gpu-rich"], True
    elif name == "num_threads":
        declarations = ["--num-threads", "-j"]
    elif kind == "bool":
        declarations = [f"--{flag}/--no-{flag}"]
    else:
        declarations = [f"--{flag}"]
    if name in _SHORT:
        declarations.insert(0, _SHORT[name])
    types = {"bool": bool, "int": int, "str": str, "size": str}  # a size ("5B") is parsed by mergekit later
    extra["type"] = types[kind]
    show_default = name not in ("out_shard_size", "verbosity")
    if name == "out_shard_size":  # stored as the parameter count; mergekit's help names the default itself
        default = None
    return click.Option(declarations, default=default, help=entry["help"], show_default=show_default, **extra)


def _add_mergekit_options(command: click.Command) -> click.Command:
    command.params.extend(_click_option(entry) for entry in stored_options())
    return command


@_add_mergekit_options
@click.command("merge")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_path", type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace OUT_PATH if it exists.")
def merge_command(config_file, out_path, overwrite, **mergekit_options) -> None:
    """Run a mergekit YAML like `mergekit-yaml`, checked first and written atomically.

    Refused before anything is written: a local model path that does not
    exist, a parameter name the method does not have (with a suggestion),
    a bad parameter value, tensors whose shapes differ between models.
    """
    from mergekit.common import parse_kmb
    from mergekit.options import MergeOptions

    from mergekit_ext.merge.preflight import run

    if mergekit_options.get("out_shard_size") is None:
        mergekit_options.pop("out_shard_size", None)
    else:
        mergekit_options["out_shard_size"] = parse_kmb(mergekit_options["out_shard_size"])
    merge_options = MergeOptions(**mergekit_options)
    merge_options.apply_global_options()
    run(config_file, out_path, merge_options, overwrite=overwrite)
    click.echo(f"wrote {out_path}")


COMMANDS = (merge_command,)
