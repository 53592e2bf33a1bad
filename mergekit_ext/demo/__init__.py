"""The demo job: ``run.py`` (build the zoo, merge with every method, evaluate) and ``cli.py``."""
