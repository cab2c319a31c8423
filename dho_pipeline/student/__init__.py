"""The student: the dual-head model, its losses and schedule, training checkpoints, evaluation, predict and export."""
