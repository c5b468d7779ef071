"""Prefect flows composing tasks/: `retrain` (the main one). No science here."""
