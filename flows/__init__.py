"""Prefect flows: compose the pipeline steps of ``tasks/``."""
