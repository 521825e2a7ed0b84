"""Imports every model family module so that each one registers itself.

The kernel imports this module (so the families are in its inlined import closure);
training code imports it too. Add one import line per family module.
"""

# isort: off
from . import registry  # noqa: F401
from . import grade_v20  # noqa: F401
from . import grade_v24  # noqa: F401
from . import grade_v2  # noqa: F401
from . import keypoint_axial3d  # noqa: F401
from . import keypoint_axial_level  # noqa: F401
from . import keypoint_sag2d  # noqa: F401
from . import keypoint_sag3d  # noqa: F401
# isort: on
