"""Old path of ``tvlang.faces.highlight``, kept for one release (tvlang 0.3): use the new one.

The module object is the same, so patches and imports through either path agree.
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("tvlang.faces.highlight")
