"""``mergekit-ext merge``: ``preflight.py`` (check a config from the safetensors headers,
then merge atomically through ``engine.run_merge_atomic``) and ``cli.py`` (the command)."""
