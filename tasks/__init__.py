"""Prefect tasks: one thin wrapper per pipeline step around the :mod:`evop` library."""
