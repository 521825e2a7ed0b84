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

# Small configs of every family (tiny backbones, 64 px): tests and CPU benchmarks build
# the real families with these; the families' defaults are the original's full sizes.
_B2, _B3 = "mobilenetv3_small_050", "efficientnet_b0"  # tiny timm 2D / timm_3d backbones
TINY_CONFIGS: dict[str, dict] = {
    "sag2d": {"backbone": _B2, "image_size": 64, "n_slices": 4},
    "sag3d": {"backbone": _B3, "image_size": 64, "depth": 8},
    "axial3d": {"backbone": _B3, "image_size": 64, "depth": 16},
    "axial_level": {"backbone": _B2, "image_size": 64, "hidden": 32,
                    "regressor_backbone": _B2, "regressor_size": 64, "max_slices": 32},
    "v2": {"sag_backbone": _B2, "axial_backbone": _B2, "sag_size": 64, "axial_size": 64,
           "axial_dim": 64, "embed_dim": 32},
    "v20": {"backbone": _B2, "size": 64, "dim": 32},
    "v24": {"axial_backbone": _B2, "sag_backbone": _B2, "size": 64, "sag_size_h": 32,
            "sag_size_w": 64, "dim": 32},
}
# The 7th-place solution's per-group blends of the stage-2 families (SOLUTION.md).
ORIGINAL_BLENDS: dict[str, dict[str, float]] = {
    "spinal": {"v2": 0.59, "v20": 0.41}, "foraminal": {"v2": 0.09, "v20": 0.91},
    "subarticular": {"v2": 0.38, "v24": 0.62}}
