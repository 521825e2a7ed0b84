"""Training-side code (folds, datasets, loop, ensemble fitting). Never inlined into the kernel."""
