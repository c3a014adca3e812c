"""``clipguard bench``: DESIGN.md's performance measurements, side by side in one run.

A composition root like ``clipguard.cli`` (it runs the worker, the model and the broker
together); nothing in the library parts imports it.
"""
