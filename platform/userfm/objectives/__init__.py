"""Objectives: the pretext tasks (``pretext``: batch building, augmentations, heads, loss wiring) and their pure
losses, one per file (``losses``: NT-Xent / InfoNCE; ``future``, ``next_event``, ``masked_item``)."""
