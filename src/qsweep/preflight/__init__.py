"""Everything checkable before training, every problem at once, each naming the field and the fix.

One module per concern (space, data, asha, evaluation, model, tracking, output, fit; validate runs
them all). Imports config, search, resources, train and evaluate helpers, never Ray or MLflow;
writes nothing (not even qsweep's cache) and starts nothing.
"""
