"""Dataset distillation: expert trajectories, trajectory matching, and evaluating a synthetic set."""
