"""Folder for nnU-Net's nnUNet_extTrainer: `export nnUNet_extTrainer=$(himae-nnunet ext-trainer-path)`.

nnU-Net imports the modules of this folder as top-level modules, so it holds only a thin re-export."""
