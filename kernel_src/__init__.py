"""Offline inference kit for the RSNA 2024 Lumbar Spine Degenerative Classification.

Everything the Kaggle kernel runs lives in this package; `build_kernel.py` inlines the
import closure of `kernel_src.kernel` into one notebook. `kernel_src.training`,
`kernel_src.synthetic` and `kernel_src.viz` are training-side only and never inlined.
"""
