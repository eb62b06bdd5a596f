"""Stage 5, ViT plans: nnU-Net plans that match a checkpoint, few-shot splits, pretrained-weight transfer."""
