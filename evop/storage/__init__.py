"""Where EvoP keeps what outlives a process: search checkpoints and the model registry.

Modules:

- ``stores``: object stores (a local directory, an S3 bucket) and their errors.
- ``retry``: the one retry policy for transient storage failures.
- ``urls``: store and server URLs without secrets in them.
- ``checkpoints``: verified per-generation checkpoints of a search.
- ``tracking``: where a run is tracked in MLflow, and whether that store answers.
- ``registry``: a finished run tracked in MLflow, its pruned model registered.
- ``lease``: one run at a time per search.
- ``s3server``: a local S3-compatible server (``rclone serve s3``) for tests and local runs.
"""
