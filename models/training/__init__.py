"""Training guide models against a base model: rollout data, objectives, the optimisation loop and recipes."""
