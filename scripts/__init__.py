"""Benchmarks and the chaos run, run from the repository root as `python -m scripts.NAME`.
A package so that they import each other and the jobs as packages."""
