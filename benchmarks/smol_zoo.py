"""Build (or open) a `smol` zoo and record its build: time, base, experts and LoRA adapters, retention.

    python benchmarks/smol_zoo.py --zoo /work/cache/zoo-smol-s0 --seed 0

writes ``results/smol-zoo-s<seed>.{json,md}``. The build is `mergekit-ext zoo DIR --preset smol
--seed N`'s (cached: an existing complete zoo is only read).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.runner import markdown_table, save_results, zoo_context  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", required=True, help="zoo folder (built here when it is not complete)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    from mergekit_ext.zoo.smol import build_smol_zoo, format_smol_report, smol_report_rows

    zoo = build_smol_zoo(args.zoo, seed=args.seed)
    manifest = zoo.manifest
    metrics = manifest["metrics"]
    retention = list(manifest.get("retention", {}))
    result = {
        **zoo_context(zoo),
        "seed": manifest["seed"],
        "build_seconds": manifest["build_seconds"],
        "build": metrics["build"],
        "parameters": manifest["parameters"],
        "chat": manifest["chat"],
        "tasks": {name: entry["description"] for name, entry in manifest["tasks"].items()},
        "retention_tasks": {name: manifest["retention"][name]["description"] for name in retention},
        "base": metrics["base"],
        "experts": metrics["experts"],
        "adapters": metrics["adapters"],
    }
    sections = [f"# smol zoo, seed {manifest['seed']}", "", "```", format_smol_report(manifest), "```", ""]
    for split in ("validation", "test"):
        rows = [(task, base, expert, lora) + tuple(metrics["experts"][task][name][split] for name in retention) for task, base, expert, lora in smol_report_rows(manifest, split)]
        header = ["task", "base", "expert", "LoRA"] + [f"{name}: expert's retention" for name in retention]
        sections += [f"## {split}", "", markdown_table(header, rows), ""]
        sections += [f"Base on {name}: {metrics['base'][name][split]:.3f}." for name in retention] + [""]
    build = metrics["build"]
    sections.append(
        f"Built in {manifest['build_seconds']:.0f} s wall ({build['cpu_seconds']:.0f} s CPU, {build['threads']} thread(s)); "
        f"phases (s): {build['phase_seconds']}; fine-tuning order {build['finetune_order']}."
    )
    save_results(args.out, f"smol-zoo-s{manifest['seed']}", result, "\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
