"""Where work runs: in this process, in a pool of local worker processes, or on a Dask cluster (`executors`), and
how the cores of a machine are shared between the workers and the threads of each (`cores`). Imported by the
writers (one conversion split into work units) and by `ckptx batch` (many conversions); imports nothing of ckptx
but its errors and version."""
