"""Ray Tune runs the sweep: trials, baselines, the final stage, the live view, ablation
grids; and `qsweep status`, which reads the same output folder and MLflow without starting Ray.

The only stage that imports Ray's runtime; it wires search, resources, train, evaluate, tracking and
report (the progress table).
"""
