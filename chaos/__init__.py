"""Fault injection, drills and the simulated vLLM worker.

- `chaos.inject`: faults injected at the router's adapter seam, in front of real backends
  (`Chaos`, `ChaosAdapter`), as the `chaos:` config section and the admin API ask;
  `chaos.experiments`: one experiment as it runs (its window, targets and share).
- `chaos.faults`, `chaos.sim`: the simulated vLLM worker, and the faults it acts itself.

Nothing is imported here, so that the simulated worker does not load the adapters.
"""
