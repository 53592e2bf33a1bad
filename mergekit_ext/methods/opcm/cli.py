"""``mergekit-ext continual init / add / show``: continual merging with a persisted state."""

from __future__ import annotations

import json

import click

from mergekit_ext.methods.opcm import (
    CONTINUAL_METHODS,
    DEFAULT_ALPHA,
    DEFAULT_COEFFICIENT,
    DEFAULT_DENSITY,
)
from mergekit_ext.output import quiet_option


@click.group("continual")
def continual_group() -> None:
    """Continual merging: keep a merged model and add fine-tunes one at a time.

    The state folder is the merged model itself (load it with transformers or
    lm-eval) plus what is needed to continue: the running accumulator, the
    task-vector norms and the history. `add` reads only the base, the state
    and the new model.
    """


@continual_group.command("init")
@click.argument("state", type=click.Path())
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--base", required=True, type=click.Path(exists=True, file_okay=False), help="The pretrained model the fine-tunes started from.")
@click.option("--method", type=click.Choice(CONTINUAL_METHODS), default="opcm", show_default=True, help="opcm, or a paper baseline: continual task arithmetic (ta), TIES, weight average.")
@click.option("--alpha", type=float, default=DEFAULT_ALPHA, show_default=True, help="opcm: split rank, first r with cumsum(s)/sum(s) > alpha.")
@click.option("--zero-diagonal/--keep-diagonal", default=True, show_default=True, help="opcm: also zero the rotated diagonal (current FusionBench; the first release kept it).")
@click.option("--coefficient", type=float, default=DEFAULT_COEFFICIENT, show_default=True, help="ta, ties: scale c of each task vector (paper: 0.3 for 8 tasks, 0.1 for 14/20).")
@click.option("--density", type=float, default=DEFAULT_DENSITY, show_default=True, help="ties: fraction kept by magnitude, per tensor.")
@click.option("--device", default="cpu", show_default=True, help="Where to compute (e.g. cuda); files stay on CPU.")
@click.option("--overwrite", is_flag=True, help="Replace STATE if it exists.")
@quiet_option
def init_command(state, model, base, method, alpha, zero_diagonal, coefficient, density, device, overwrite, quiet) -> None:
    """Start STATE from BASE and a first MODEL."""
    from mergekit_ext.methods.opcm.format import describe_state, init_state
    from mergekit_ext.methods.opcm.kernel import ContinualOptions

    options = ContinualOptions(method=method, alpha=alpha, zero_diagonal=zero_diagonal, coefficient=coefficient, density=density)
    data = init_state(state, base, model, options=options, device=device, overwrite=overwrite, progress=not quiet)
    for line in describe_state(data):
        click.echo(line)


@continual_group.command("add")
@click.argument("state", type=click.Path(exists=True, file_okay=False))
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--base", default=None, type=click.Path(exists=True, file_okay=False), help="The base, if it moved since init (checked by content hash).")
@click.option("--device", default="cpu", show_default=True, help="Where to compute (e.g. cuda); files stay on CPU.")
@click.option("--allow-repeat", is_flag=True, help="Accept a model whose content is already in the state.")
@quiet_option
def add_command(state, model, base, device, allow_repeat, quiet) -> None:
    """Merge one more MODEL into STATE.

    Reads only the base, STATE and MODEL; the models merged before are not
    needed. STATE is replaced atomically at the end.
    """
    from mergekit_ext.methods.opcm.format import add_model, describe_state

    data = add_model(state, model, base=base, device=device, allow_repeat=allow_repeat, progress=not quiet)
    for line in describe_state(data):
        click.echo(line)


@continual_group.command("show")
@click.argument("state", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the state's metadata as JSON.")
def show_command(state, as_json) -> None:
    """Print STATE's method, base and history.

    One row per model in merge order: content hash, task-vector norm, the
    global scale after that step and the merged task vector's norm.
    """
    from mergekit_ext.methods.opcm.format import describe_state, read_state

    data = read_state(state)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for line in describe_state(data):
        click.echo(line)


COMMANDS = (continual_group,)
