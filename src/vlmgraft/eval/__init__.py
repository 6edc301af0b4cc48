"""Evaluation: `vlmgraft eval` (`runner.run_eval`), its tasks (`tasks`), answer matching (`normalize`), box scores
(`boxes`), the text-only parity check (`parity`) and the written report. README.md shows the in-process API ("Evaluate
in Python") and how to run standard benchmarks through `vlmgraft serve`.
"""
