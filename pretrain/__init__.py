"""Pretraining stage: data preparation, loading and the training loop (installed as himae_nnunet.pretrain)."""
