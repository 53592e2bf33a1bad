"""Run FusionBench's own code on model folders; run by the FusionBench venv's python.

Not importable from the main environment (FusionBench 0.2.33 needs
transformers < 5, mergekit 0.1.5 needs 5), so this file imports nothing from
mergekit or mergekit_ext. State dicts come in as safetensors model folders and
the result goes out as one safetensors file; ``fusionbench_compare.py`` does
the measuring and the comparison.

    python fusionbench_worker.py tall-paper OUT.safetensors BASE MODEL... --tall-lambda 0.4 --k 2 --scale 1
    python fusionbench_worker.py tall-class OUT.safetensors BASE MODEL... (same options)
    python fusionbench_worker.py opcm OUT.safetensors BASE MODEL... --alpha 0.5
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path
from typing import Dict, List

import torch
from safetensors.torch import load_file, save_file


def load_folder(path: str) -> Dict[str, torch.Tensor]:
    state: Dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(file))
    return state


def consensus_from_masks(masks: torch.Tensor, k: int) -> torch.Tensor:
    # FusionBench's construct_consensus_mask only reads masks from disk (and its
    # loader cannot read what find_optimal_mask saves), so its counting rule,
    # "sum of task masks >= k", is applied here to the masks its code generated.
    return masks.float().sum(dim=0) >= k


def tall_paper(args) -> Dict[str, torch.Tensor]:
    """Consensus TA from fusion_bench.method.tall_mask.utils.generate_task_masks (the paper's |τt|)."""
    from fusion_bench.method.tall_mask.utils import generate_task_masks
    from fusion_bench.utils import state_dict_to_vector, vector_to_state_dict

    base = load_folder(args.base)
    flat_base = state_dict_to_vector(base)
    flat_models = torch.stack([state_dict_to_vector(load_folder(path)) for path in args.models])
    task_vectors = flat_models - flat_base
    multitask = task_vectors.sum(dim=0)
    masks = generate_task_masks(task_vectors, flat_models, flat_base, tv=multitask, tall_mask_lambda=args.tall_lambda)
    consensus = consensus_from_masks(masks, args.k)
    merged = flat_base + args.scale * multitask * consensus
    # vector_to_state_dict overwrites its reference dict in place: give it a copy.
    return vector_to_state_dict(merged, copy.copy(base))


def tall_class(args) -> Dict[str, torch.Tensor]:
    """Same, with the masks of TallMaskTaskArithmeticAlgorithm (compares |θ0 − τt|)."""
    from fusion_bench.method.tall_mask.task_arithmetic import generate_task_masks
    from fusion_bench.utils.state_dict_arithmetic import state_dict_sub, state_dict_sum

    base = load_folder(args.base)
    vectors: List[Dict[str, torch.Tensor]] = [state_dict_sub(load_folder(path), base) for path in args.models]
    multitask = state_dict_sum(vectors)
    masks = [generate_task_masks(multitask, vector, base, tall_mask_lambda=args.tall_lambda) for vector in vectors]
    merged = {}
    for name in base:
        consensus = consensus_from_masks(torch.stack([mask[name] for mask in masks]), args.k)
        merged[name] = base[name] + args.scale * multitask[name] * consensus
    return merged


def opcm(args) -> Dict[str, torch.Tensor]:
    """fusion_bench.method.opcm.opcm_general.OPCM on a CausalLMPool of the folders, in the given order."""
    import lightning as L
    from fusion_bench.method.opcm.opcm_general import OPCM
    from fusion_bench.modelpool import CausalLMPool

    models = {"_pretrained_": args.base}
    names = []
    for index, path in enumerate(args.models):
        names.append(f"model_{index:02d}")
        models[names[-1]] = path
    pool = CausalLMPool(models, tokenizer=None, model_kwargs={"torch_dtype": "float32"})
    algorithm = OPCM(alpha=args.alpha, shuffle_order=False, seed=0, save_on_every_step=False)
    fabric = L.Fabric(accelerator="cpu", devices=1)
    fabric.launch()
    algorithm._fabric_instance = fabric
    merged = algorithm.run(pool)
    return {name: tensor.detach().clone().contiguous() for name, tensor in merged.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["tall-paper", "tall-class", "opcm"])
    parser.add_argument("out")
    parser.add_argument("base")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--tall-lambda", type=float, default=0.4)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_grad_enabled(False)
    run = {"tall-paper": tall_paper, "tall-class": tall_class, "opcm": opcm}[args.task]
    state = run(args)
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, args.out)


if __name__ == "__main__":
    main()
