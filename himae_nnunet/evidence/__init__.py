"""Evidence: low-label comparisons of pretraining arms through stock nnU-Net, with statistics."""
