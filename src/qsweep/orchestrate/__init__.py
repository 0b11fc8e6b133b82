"""Ray Tune runs the sweep: trials, baselines, the final stage, resume state, ablation grids.

The only stage that imports Ray's runtime; it wires search, resources, train, evaluate and tracking.
"""
