"""The benchmark CLI: ``python -m gmm_allreduce.bench --help``.

- scenarios.py: the scenarios of shapes.json as test cases.
- methods.py: what is timed on each rank (the op at each comm_turn, the unfused composition, its
  compute alone, its all-reduce alone, and the GPU library baselines).
- runner.py: spawning the ranks, timing, the progress bar.
- report.py: the summary: table, CSV, Markdown, PNG plot.
"""
