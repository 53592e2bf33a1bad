"""The one declaration of ``-q/--quiet``, for the commands that pass it on (``progress=not quiet``).

``cli.py`` gives every other command the same option (with the same help) and
configures warnings, logging and progress bars from it.
"""

import click

QUIET_HELP = "No progress bars and no log output; only results and errors."

quiet_option = click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)
