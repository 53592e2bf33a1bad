"""mergekit-ext: recent model-merging methods for mergekit.

Importing the package registers its merge methods with mergekit (registering
twice is harmless). Stock ``mergekit-yaml`` needs no import at all: the
installed startup hook registers them when mergekit loads its methods.
"""

__version__ = "0.1.0"

# mergekit's methods first: if the startup hook is installed it registers ours
# as they load, and the explicit call below then finds nothing left to do.
import mergekit.merge_methods  # noqa: E402,F401

from mergekit_ext.registry import register_all  # noqa: E402

register_all()

__all__ = ["register_all", "__version__"]
