"""Evaluation: downstream tasks on frozen embeddings, heads, the yardsticks that need no pretraining, the
protocol (splits, cross-fitting, paired intervals), metrics and embedding drift."""
