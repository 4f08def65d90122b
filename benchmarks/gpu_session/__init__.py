"""The GPU session: one prepared command that measures everything a lease is for.

``benchmarks/run_gpu.sh`` runs :mod:`benchmarks.gpu_session.run`, which runs each step of
:data:`benchmarks.gpu_session.run.STEPS` in its own process under a hard time budget and
appends its results, as they are made, to one JSON-lines file per stage under the output
folder. ``--dry-run`` runs every step's plumbing on the CPU on tiny shapes (Triton's
interpreter, fp32). :mod:`benchmarks.gpu_session.report` turns the files into
``benchmarks/results/<gpu>-<date>.{json,md,png}`` with the issue's targets met / missed.
See benchmarks/README.md, "The GPU session".
"""
