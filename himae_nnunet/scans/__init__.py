"""Stage 1, raw scans: reading CT files (NIfTI, NRRD, MHA, DICOM) and writing nnU-Net raw datasets."""
