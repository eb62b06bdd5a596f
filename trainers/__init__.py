"""nnU-Net trainer classes (installed as himae_nnunet.trainers)."""
