"""`adapters batch`: plans of merge/export jobs, keyed by the digest of their inputs, run locally or on Ray.

- `plan`: read and validate a YAML/JSON plan into jobs (nothing runs on a bad plan).
- `keys`: a job's key: the digest of its inputs (adapter version digests, base file digests,
  the recipe, the tool version).
- `worker`: what runs one job in a worker process or Ray task (the same `run_merge` as `adapters merge`).
- `executors`: a local process pool, or Ray tasks declaring their CPU and memory needs.
- `runner`: leases in the registry (no job twice at once), the cache (a key that already produced an
  artifact that still verifies is not redone), and the per-job report.
"""
