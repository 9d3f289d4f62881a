"""Evaluation: the judge (`judge.py`, a toy-world concept detector with a feature space for FD) and the metrics
registry (`metrics.py`: leakage, retention, adherence, fd, cp, concept_affinity; FID, CLIP score, CMMD)."""
