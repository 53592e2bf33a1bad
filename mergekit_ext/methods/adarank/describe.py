"""Human-readable lines for a learned file's metadata (``mergekit-ext adarank show``)."""

from __future__ import annotations

from typing import Dict, List


def _kept(counts: Dict) -> str:
    return f"{counts['before']} -> {counts['after']} of {counts['band']}"


def describe(info: Dict) -> List[str]:
    """Human-readable lines for a learned file's metadata (also files from earlier releases)."""
    kept = info["kept_components"]
    training = info["training"]
    objective = training.get("objective", "entropy")
    mode = "coefficients only (masks frozen)" if training.get("coefficients_only") else "masks and coefficients"
    lines = [
        f"variant {info['variant']}  prior {info['prior']}  init_rank_ratio {info['init_rank_ratio']}  "
        f"max_rank_ratio {info['max_rank_ratio']}"
        + (f"  common_space_fraction {info['common_space_fraction']}" if "common_space_fraction" in info else ""),
        f"training: objective {objective}, {mode}, {training['steps']} steps, lr {training['lr']} "
        f"({training.get('lr_schedule', 'constant')}), "
        f"batch {training['batch_size']} per task, seed {training['seed']}",
        f"kept singular components: {_kept(kept)} candidates",
    ]
    for label, key in (("task", "by_task"), ("layer type", "by_type")):
        for name, counts in (kept.get(key) or {}).items():
            lines.append(f"  {label} {name:<24} {_kept(counts)}")
    coefficients = info["coefficients"]
    lines.append("coefficients: mean {mean:.4g}, min {min:.4g}, max {max:.4g}".format(**coefficients))
    for name, row in (coefficients.get("by_task") or {}).items():
        lines.append(f"  task {name:<29} mean {row['mean']:.4g}, range {row['min']:.4g} .. {row['max']:.4g}")
    held = info.get("held_out_objective")
    if held is not None:
        before, after = held["before"], held["after"]
        count = training.get("held_out_per_task", ["?"])[0]
        lines.append(f"{held['name']} on held-out prompts ({count} per task; {held['measure']}): total {before['total']:.4f} -> {after['total']:.4f}")
    else:
        before, after = info["entropy_before"], info["entropy_after"]
        lines.append(f"answer entropy (nats, fixed prompts): total {before['total']:.4f} -> {after['total']:.4f}")
    for name in info["task_names"]:
        lines.append(f"  {name:<16} {before[name]:.4f} -> {after[name]:.4f}")
    held_bytes = info.get("learner_bytes")
    if held_bytes:
        parts = ", ".join(f"{key} {value / 2**20:.1f}" for key, value in held_bytes.items() if key != "model_float32")
        lines.append(f"learner state (MiB): {parts}; the model itself in float32 is {held_bytes['model_float32'] / 2**20:.1f}")
    seconds = info.get("seconds")
    if seconds:
        lines.append("time: " + ", ".join(f"{key} {value:.1f} s" for key, value in seconds.items()))
    return lines
