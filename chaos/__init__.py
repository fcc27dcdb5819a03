"""Fault injection, drills and the simulated vLLM worker."""
