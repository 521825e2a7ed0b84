"""A phantom competition shared by the stage-2 tests (generated once per test session).

`phantom` is a session-scoped pytest fixture: import it into a test module
(`from stage2_phantom import phantom`) to use it. `TINY_V2` is a v2 config small enough
for CPU tests (timm's `test_resnet`, 32 px crops sized in mm).
"""

from __future__ import annotations

import pytest

N_TRAIN, SEED, SIZE = 24, 11, 64

TINY_V2 = dict(sag_backbone="test_resnet", axial_backbone="test_resnet", sag_window="point",
               crop_unit="mm", sag_crop_h=40.0, sag_crop_w=40.0, sag_size=32,
               axial_crop=60.0, axial_size=32, axial_center="point", axial_slices=3,
               axial_dim=32, embed_dim=16)


@pytest.fixture(scope="session")
def phantom(tmp_path_factory):
    """Directory of a 24-study phantom competition (64 px images, no test studies).

    Each test module that imports the fixture gets its own fixture definition, so the
    phantom is written once under the session's base temp dir and reused."""
    from kernel_src.synthetic import generate_competition

    out = tmp_path_factory.getbasetemp() / "stage2_phantom"
    if not (out / "truth" / "landmarks.csv").is_file():
        generate_competition(out, n_train=N_TRAIN, n_test=0, seed=SEED, size=SIZE)
    return out
