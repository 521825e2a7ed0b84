"""Imports every model family module so that each one registers itself.

The kernel imports this module (so the families are in its inlined import closure);
training code imports it too. Add one import line per family module.
"""

from . import registry  # noqa: F401
