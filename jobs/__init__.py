"""Entry points a user runs: `python jobs/pretrain.py`, `python jobs/compress.py` (or
`ray job submit -- python jobs/...`). A package only so that benchmarks and tests can import
them (`from jobs import pretrain`) from the repository root."""
