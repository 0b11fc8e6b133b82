"""One trial: model source, data, LoRA targets, 4-bit base + LoRA trained with the Trainer.

Imports config, resources (the estimate it logs) and evaluate; knows nothing of Ray or MLflow.
"""
