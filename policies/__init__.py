"""Decisions the edge and the router ask for: which backend, and (later) may this go on."""
