"""The AdaRank learner's public API in one place (``from mergekit_ext.methods.adarank.learn import …``).

Each name lives in the module of its job:

    options.py     LearnOptions (validated, the variant's defaults filled in), the held-out split
    prompts.py     prompts from files and zoos, chat templates, tokens, where an answer ends
    decoding.py    greedy answers from token ids (KV cache), logits at answer positions
    teacher.py     the distillation teachers' cached answers and top-k log-probabilities
    factorise.py   origins, task vectors and candidate components, streamed from disk
    merged.py      the differentiable merged model run through a weightless architecture
    objectives.py  the Objective interface and its three objectives, chosen by name once
    training.py    the Adam loop
    masks.py       hard masks and the components each keeps
    learner.py     prepare / run / learn and the Setup they share
    apply.py       writing the merged model a learned file gives (mergekit's engine)
    describe.py    human-readable lines for a learned file
"""

from mergekit_ext.methods.adarank.apply import merge_config, write_merged_model
from mergekit_ext.methods.adarank.decoding import Answered, answer_logits, cache_keyword, greedy_answers
from mergekit_ext.methods.adarank.describe import describe
from mergekit_ext.methods.adarank.factorise import Entry, factorise
from mergekit_ext.methods.adarank.learner import PREPARED_OPTIONS, LearnResult, Setup, learn, prepare, run
from mergekit_ext.methods.adarank.masks import layer_type, mask_row_names
from mergekit_ext.methods.adarank.merged import MergedModel, empty_architecture, learner_bytes, tied_aliases, tied_groups
from mergekit_ext.methods.adarank.objectives import (
    OBJECTIVE_TYPES,
    AnswerEntropyObjective,
    DistillObjective,
    EntropyObjective,
    Objective,
    answer_entropy,
    distillation_kl,
    make_objective,
)
from mergekit_ext.methods.adarank.options import LearnOptions, held_out_count
from mergekit_ext.methods.adarank.prompts import (
    MAX_PROMPT_CHARS,
    ZOO_TARGET_DELIMITER,
    chat_prompts,
    chat_template_of,
    end_of_turn_ids,
    read_prompts,
    stop_token_ids,
    zoo_prompts,
)
from mergekit_ext.methods.adarank.teacher import TeacherItem, teacher_cache
from mergekit_ext.methods.adarank.training import train

__all__ = [
    "Answered",
    "AnswerEntropyObjective",
    "DistillObjective",
    "Entry",
    "EntropyObjective",
    "LearnOptions",
    "LearnResult",
    "MAX_PROMPT_CHARS",
    "MergedModel",
    "OBJECTIVE_TYPES",
    "Objective",
    "PREPARED_OPTIONS",
    "Setup",
    "TeacherItem",
    "ZOO_TARGET_DELIMITER",
    "answer_entropy",
    "answer_logits",
    "cache_keyword",
    "chat_prompts",
    "chat_template_of",
    "describe",
    "distillation_kl",
    "empty_architecture",
    "end_of_turn_ids",
    "factorise",
    "greedy_answers",
    "held_out_count",
    "layer_type",
    "learn",
    "learner_bytes",
    "make_objective",
    "mask_row_names",
    "merge_config",
    "prepare",
    "read_prompts",
    "run",
    "stop_token_ids",
    "teacher_cache",
    "tied_aliases",
    "tied_groups",
    "train",
    "write_merged_model",
    "zoo_prompts",
]
