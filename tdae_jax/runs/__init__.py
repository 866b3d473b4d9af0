"""The run engine shared by the protection commands: the workdir contract as small, reusable pieces.

* ``errors``: ``UsageError`` (the run cannot start: exit 2) and ``RunError`` (the workdir became unwritable: exit 1,
  re-run to resume).
* ``lock``: one run per workdir (a pid/host lock file; stale locks taken over).
* ``workdir``: ``Workdir`` (paths, read-only preflight of lock and settings, ``open``: lock + manifest, overwrite).
* ``inputs``: this process's entries, their loading, batches of one working shape (SPMD padding).
* ``batches``: the loop over batches, generic over a "protect one batch" callable; progress and ETA.
* ``finish``: one image: finite check, atomic PNG, on-disk metrics, curves, then ``done``.
* ``report``: merged entries, metrics.jsonl/csv, config.json, report.html (preview editor built once).

``tdae_jax.pipeline.run`` (``python -m experiments.tdae``) is the sequence of these calls; the DLADiff runner and
the evaluation command can use the same pieces with their own protect/finish callables.
"""
