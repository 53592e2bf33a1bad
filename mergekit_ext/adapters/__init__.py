"""LoRA adapters through peft: ``peft_io.py`` (read, write, check adapter folders; the one home
for adapter I/O), ``merge.py`` (adapter-in, adapter-out merging with any mergekit method),
``cli.py`` (``mergekit-ext lora merge``). This module imports nothing heavy.
"""

ADAPTER_DTYPES = ("bfloat16", "float16", "float32")
