"""How much memory a trial needs, and the Ray resource request that packs trials by it.

Imports config, search (to apply a trial's params) and train (targets, to read a model's layers
without weights; models, for the cache); never loads weights, never imports Ray or MLflow.
"""
