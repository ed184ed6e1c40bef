"""Tasks with exactly checkable answers, for training and evaluating guide models on real base models."""
