"""Evaluation: the verification protocol (Accuracy-Flip / XNorm), embedding extraction on any world size,
validation during training, IJB-style template verification and MegaFace-style identification."""
