"""Benchmarks: what KSM costs (merge, unmerge, CoW break, ksmd CPU) and what it
saves (three views, reconciled), cross-checked against the kernel's ksm_tests.

``ksmbench bench`` runs them (:mod:`.cli`); results go to a run directory
(:mod:`.store`) that ``ksmbench report`` turns into figures.
"""
