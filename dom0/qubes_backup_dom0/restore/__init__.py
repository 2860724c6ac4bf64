"""Restoring: stream -> verify (receive) -> extract, plan -> apply, driven by the state machine (machine.py)."""
