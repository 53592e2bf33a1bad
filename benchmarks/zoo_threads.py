"""Is zoo training reproducible across torch thread counts? (issue 31: the demo's numbers must reproduce)

Runs the zoo's own trainer (``zoo.train.train``) on the demo zoo's base model for
``--steps`` pretraining steps at 1, 2 and again 1 torch threads, and compares a
SHA-256 of every weight, bit for bit.

    python benchmarks/zoo_threads.py --steps 40    # → results/zoo-threads.{json,md}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run(preset: str, steps: int, thread_counts) -> dict:
    import torch

    from mergekit_ext.modeling import char_tokenizer, llama_config, random_model
    from mergekit_ext.zoo.presets import PRESETS
    from mergekit_ext.zoo.train import train

    settings = PRESETS[preset]
    tokenizer = char_tokenizer(list(settings.alphabet) if settings.alphabet else None)
    config = llama_config(len(tokenizer), hidden_size=settings.hidden_size, layers=settings.layers, heads=settings.heads, intermediate_size=settings.intermediate_size)
    runs = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        model = random_model(config, seed=0)
        started = time.perf_counter()
        loss = train(model, tokenizer, settings.task_objects, steps=steps, lr=settings.pretrain_lr, batch_size=settings.batch_size, seed=0, held_out=set(), device="cpu", description="pretrain", progress=False)
        digest = hashlib.sha256()
        for _, tensor in sorted(model.state_dict().items()):
            digest.update(tensor.detach().contiguous().numpy().tobytes())
        runs.append({"threads": threads, "loss": loss, "sha256": digest.hexdigest(), "seconds": round(time.perf_counter() - started, 1)})
        print(f"threads {threads}: loss {loss:.6f}, weights sha256 {digest.hexdigest()[:16]}, {runs[-1]['seconds']} s", flush=True)
    return {"preset": preset, "steps": steps, "torch": torch.__version__, "runs": runs, "identical": len({r["sha256"] for r in runs}) == 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo-hard")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 1])
    args = parser.parse_args()
    result = run(args.preset, args.steps, args.threads)
    (RESULTS / "zoo-threads.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    lines = [
        f"# Zoo training across thread counts ({result['preset']}, {result['steps']} pretraining steps, torch {result['torch']})",
        "",
        "| threads | final loss | weights SHA-256 | seconds |",
        "|---|---|---|---|",
        *(f"| {r['threads']} | {r['loss']:.6f} | `{r['sha256'][:16]}` | {r['seconds']} |" for r in result["runs"]),
        "",
        f"Bitwise identical: **{'yes' if result['identical'] else 'no'}**.",
    ]
    (RESULTS / "zoo-threads.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
