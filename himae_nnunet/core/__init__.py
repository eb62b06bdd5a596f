"""Cross-cutting helpers every stage uses: user errors, nnU-Net folders, fault hooks, CT constants."""
