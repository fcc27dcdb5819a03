"""Drills: Chaos Toolkit experiments run against a live gateway under built-in load, judged
against the config's SLOs per phase (before, during and after the fault), and reported."""
