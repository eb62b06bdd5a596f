"""Folder for nnU-Net's nnUNet_extTrainer (see trainers/ext/README)."""
