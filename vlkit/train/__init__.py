"""Training of the align and instruct stages: stage table, checkpoints, trainer wiring, `vlkit train`."""
