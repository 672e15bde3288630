"""Evaluation: the verification protocol (Accuracy-Flip / XNorm), embedding extraction on any world size,
validation during training, IJB-style template verification and MegaFace-style identification.

    verification.py    the Accuracy-Flip / XNorm protocol
    embed.py           embeddings on any world size (safe under ZeRO-3)
    validation.py      verification during training: log lines, best-so-far, tensorboard
    ijb.py             IJB-B / IJB-C 1:1 template verification (TAR at FAR)
    ijb_images.py      IJB-B / IJB-C from the released loose crops: align, embed image + flip
    identification.py  MegaFace-style 1:N identification
    roc.py             ROC figures (matplotlib)
    clean.py           `megaface clean`: drop samples far from their class's dominant sub-center, write the pack
    cli.py             `megaface eval | embed | eval-ijb | eval-ident | clean`
"""
