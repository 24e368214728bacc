"""Training engine: losses, optimisers, train state and step, loop, checkpoints, metrics and reports."""
