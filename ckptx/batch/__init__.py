"""Batch jobs: jobs files, running every job (checked whole first), where tasks run (in process, a process pool,
Dask), and the fingerprints `--resume` uses."""
