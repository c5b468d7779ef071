"""Prefect tasks: thin wrappers adding retries, timeouts, logs and artifacts around stages. No science."""
