"""The phantom competition: a 3D lumbar-spine model rendered into Kaggle-layout DICOM.

`generate_competition(out, n_train, n_test, seed=0, size=128) -> Path`; CLI
`python -m kernel_src.synthetic --out DIR --train-studies N --test-studies M --seed S`.
Modules: anatomy (3D model, landmarks), pathology (grades), series (acquisition
geometry), render (intensities), study_plan (one study, quirks), competition (files),
dicom_writer (DICOM files).
"""

from kernel_src.synthetic.competition import generate_competition

__all__ = ["generate_competition"]
