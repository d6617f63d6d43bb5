"""Training: Ray Train pretraining (``pretrain``), early stopping, Ray Tune scaling sweeps and the power-law fits."""
