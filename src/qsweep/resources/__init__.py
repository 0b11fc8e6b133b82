"""How much memory a trial needs, and the Ray resource request that packs trials by it.

Imports config and train.targets (to read a model's layers without weights); never loads weights.
"""
