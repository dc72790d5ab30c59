"""NPID pretraining (Wu et al. 2018): recipes and the checkpoints the suite evaluates."""
