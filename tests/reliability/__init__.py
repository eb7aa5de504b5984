"""Adversarial, fault and soak suites (tests/reliability/run publishes their figures)."""
