"""Benchmarks of user-credits (issue 7): run with `python -m benchmarks.run`; see benchmarks/README.md."""
