"""``mergekit-ext adarank learn / show``: learn a mask/coefficient file, inspect one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import click

from mergekit_ext.methods.adarank import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_COMMON_SPACE_FRACTION,
    DEFAULT_LR,
    DEFAULT_LR_SCHEDULE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_RANK_RATIO,
    DEFAULT_OBJECTIVE,
    DEFAULT_STEPS,
    DEFAULT_TOP_K,
    DEFAULT_VARIANT,
    DEFAULT_ZOO_UNLABELED,
    FACTOR_DTYPES,
    LR_SCHEDULES,
    OBJECTIVES,
    VARIANT_DEFAULTS,
    VARIANTS,
)
from mergekit_ext.output import quiet_option


def _defaults(key: str) -> str:
    return ", ".join(f"{variant} {values[key]}" for variant, values in VARIANT_DEFAULTS.items())


def _resolve_inputs(models, base, zoo_dir, prompt_files, unlabeled=0):
    """Models, base, task names and one prompt pool per model from the command's options."""
    from mergekit_ext.methods.adarank import learn

    models = [Path(model).absolute() for model in models]
    names = [model.name for model in models]
    pools: List[List[str]] = [[] for _ in models]
    if zoo_dir is not None:
        from mergekit_ext.zoo import load_zoo

        zoo = load_zoo(zoo_dir)
        experts = {zoo.expert(task).absolute(): task for task in zoo.tasks}
        if not models:
            models = list(experts)
            names = list(experts.values())
        else:
            missing = [str(model) for model in models if model not in experts]
            if missing:
                raise ValueError(f"adarank: not experts of the zoo {zoo.root}: {', '.join(missing)}; give --prompts instead")
            names = [experts[model] for model in models]
        pools = [learn.zoo_prompts(zoo, name, unlabeled=unlabeled) for name in names]
        base = base if base is not None else zoo.base
    if not models:
        raise ValueError("adarank: give the models to merge (or --zoo to use a zoo's experts)")
    if prompt_files:
        files = [learn.read_prompts(path) for path in prompt_files]
        if len(files) == 1:
            pools = [pool + files[0] for pool in pools]
        elif len(files) == len(models):
            pools = [pool + extra for pool, extra in zip(pools, files)]
        else:
            raise ValueError(
                f"adarank: give one --prompts file for every model ({len(models)}) or one shared by all, got {len(files)}"
            )
    if not all(pools):
        raise ValueError("adarank: no prompts; give --zoo or --prompts")
    return models, base, names, pools


@click.group("adarank")
def adarank_group() -> None:
    """AdaRank: learn which singular components of each task vector to keep.

    `learn` trains binary masks and per-tensor coefficients on unlabeled
    prompts (--objective: distillation from the experts' own greedy answers, or
    the entropy of the answer) and writes a small file;
    `merge_method: adarank` with `parameters: {file: ...}` applies it in the
    stock mergekit-yaml.
    """


@adarank_group.command("learn")
@click.argument("models", nargs=-1, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="The learned file to write (.safetensors).")
@click.option("--base", default=None, type=click.Path(exists=True, file_okay=False), help="θ0, the pretrained model (required for --variant ta; default with --zoo: the zoo's base).")
@click.option("--zoo", "zoo_dir", default=None, type=click.Path(exists=True, file_okay=False), help="A built zoo: its experts (when no MODELS are given), its base, and each task's validation prompts.")
@click.option("--unlabeled", type=click.IntRange(min=0), default=DEFAULT_ZOO_UNLABELED, show_default=True, help="With --zoo: this many more prompts per task from the zoo's task generators (never a validation or test prompt; answers unused).")
@click.option("--prompts", "prompt_files", multiple=True, type=click.Path(exists=True, dir_okay=False), help="Prompts, one per line (.txt) or JSONL; once for all tasks, or once per model in order. Added to the zoo's.")
@click.option("--variant", type=click.Choice(VARIANTS), default=DEFAULT_VARIANT, show_default=True, help="The base method step 0 is: ta (Task Arithmetic, origin θ0), cart (CART, origin θavg), tsv_m (TSV-M) or iso_cts (Iso-CTS; Iso-C with --common-space-fraction 1), whose candidate components are the columns of the method's orthogonalized stack.")
@click.option("--prior", type=float, default=None, help=f"Initial coefficient, the base method's λ  [default: {_defaults('prior')}]")
@click.option("--init-rank-ratio", type=float, default=None, help=f"Components kept at step 0 (1 for tsv_m / iso_cts)  [default: {_defaults('init_rank_ratio')}]")
@click.option("--common-space-fraction", type=float, default=DEFAULT_COMMON_SPACE_FRACTION, show_default=True, help="iso_cts: share of each matrix's rank in the common subspace (1: Iso-C).")
@click.option("--max-rank-ratio", type=float, default=DEFAULT_MAX_RANK_RATIO, show_default=True, help="Candidate band per matrix; components below it are dropped (memory ~ 2·ratio·model per task).")
@click.option("--steps", type=int, default=DEFAULT_STEPS, show_default=True)
@click.option("--lr", type=float, default=DEFAULT_LR, show_default=True, help="Adam learning rate for logits and coefficients.")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default=DEFAULT_LR_SCHEDULE, show_default=True, help="Learning rate over the steps: constant, or cosine decay to 0.")
@click.option("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, show_default=True, help="Prompts per task per step.")
@click.option("--objective", type=click.Choice(OBJECTIVES), default=DEFAULT_OBJECTIVE, show_default=True, help="Label-free loss: entropy after each prompt, entropy over the merged model's own greedy answer, or distill (KL from each expert's greedy answers to its task's prompts; teacher outputs cached once).")
@click.option("--coefficients-only", is_flag=True, help="Freeze the masks at the base method's and learn only the coefficients (AdaMerging-style).")
@click.option("--top-k", type=int, default=DEFAULT_TOP_K, show_default=True, help="distill: teacher log-probabilities kept per answer position (the rest of the mass is one bucket).")
@click.option("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, show_default=True, help="Greedy answers (distill, entropy-answer) stop at a newline or EOS (with a chat template: its end-of-turn token or EOS), or after this many tokens.")
@click.option("--held-out", type=int, default=None, help="Prompts per task kept out of training to report the objective before/after  [default: min(batch size, half the prompts)]")
@click.option("--factor-dtype", type=click.Choice(FACTOR_DTYPES), default="float32", show_default=True, help="Storage of the learner's singular vectors and of the non-matrix task vectors (bfloat16 halves the learner's largest parts; the merge itself always recomputes float32 SVDs).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--chat-template/--no-chat-template", "chat_template", default=None, help="Pose each prompt as a user turn through the tokenizer's chat template; greedy answers then end at the template's end-of-turn token or EOS (not at a newline)  [default: on when the tokenizer has a chat template]")
@click.option("--add-special-tokens", is_flag=True, help="Let the tokenizer add BOS/EOS to prompts (off, like lm-eval's log-likelihood requests).")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute each decoder layer's merged weights and activations in the backward pass: less memory, about one more forward per step.")
@click.option("--device", default="cpu", show_default=True, help="Where to learn (e.g. cuda).")
@click.option("--merge-out", default=None, type=click.Path(file_okay=False), help="Also write the merged model here (mergekit's engine, merge_method adarank).")
@click.option("--dtype", default=None, help="Output dtype for --merge-out (default: the models').")
@click.option("--overwrite", is_flag=True, help="Replace --out and --merge-out if they exist.")
@quiet_option
def learn_command(models, out, base, zoo_dir, unlabeled, prompt_files, merge_out, dtype, overwrite, quiet, **learn_options) -> None:
    """Learn AdaRank masks and coefficients for MODELS and write them to --out."""
    from mergekit_ext import io
    from mergekit_ext.methods.adarank.format import is_learned_file

    out_path = Path(out).absolute()
    # Refused before learning: outputs that overlap an input or each other, a file or
    # folder that is not ours to replace, a dtype mergekit cannot write.
    inputs = [*models, base, zoo_dir, *prompt_files]
    io.check_output_not_input(out_path, inputs)
    io.check_replaceable(out_path, overwrite=overwrite, ours=is_learned_file)
    if merge_out is not None:
        io.check_output_not_input(merge_out, [*inputs, out_path])
        io.check_replaceable(merge_out, overwrite=overwrite)
    io.check_dtype_name(dtype)
    if zoo_dir is None and click.get_current_context().get_parameter_source("unlabeled") is not click.core.ParameterSource.DEFAULT:
        raise click.BadParameter("draws prompts from a zoo's task generators: give --zoo too (or more prompts with --prompts)", param_hint="--unlabeled")
    from mergekit_ext.methods.adarank import learn
    from mergekit_ext.methods.adarank.format import write_learned_file

    models, base, names, pools = _resolve_inputs(models, base, zoo_dir, prompt_files, unlabeled)
    options = learn.LearnOptions(**learn_options)  # the remaining options are LearnOptions' fields, by name
    result = learn.learn(models, pools, base=base, options=options, task_names=names, progress=not quiet)
    write_learned_file(out_path, result.masks, result.coefficients, result.info, result.fingerprints)
    for line in learn.describe(result.info):
        click.echo(line)
    click.echo(f"wrote {out_path}")
    if merge_out is not None:
        learn.write_merged_model(out_path, models, merge_out, base=base, dtype=dtype, overwrite=overwrite)
        click.echo(f"wrote {Path(merge_out).absolute()}")


@adarank_group.command("show")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the file's metadata as JSON.")
def show_command(file, as_json) -> None:
    """Print a learned file's settings, kept ranks and entropy before/after."""
    from mergekit_ext.methods.adarank.format import open_learned_file
    from mergekit_ext.methods.adarank.learn import describe

    info = open_learned_file(file).info
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for line in describe(info):
        click.echo(line)


COMMANDS = (adarank_group,)
