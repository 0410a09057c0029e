"""Where EvoP keeps what outlives a process: search checkpoints and the model registry.

Modules:

- ``checkpoints``: object stores (local directory, S3) and verified per-generation checkpoints.
- ``registry``: a finished run tracked in MLflow, its pruned model registered.
- ``s3server``: a local S3-compatible server (``rclone serve s3``) for tests and local runs.
"""
