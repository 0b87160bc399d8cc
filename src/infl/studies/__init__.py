"""Reproducible experiments built on infl's public API (the fragility study, …).

:mod:`infl.studies.models` holds the models these studies train.
"""
