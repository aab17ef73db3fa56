"""Evaluation: metrics (Dice, HD95, lesion-wise), per-case scoring, the cross-modality runner over
checkpoints x test sequences x cases, reports, and the seeded study aggregation."""
