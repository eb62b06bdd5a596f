"""Stage 4, checkpoint: our file format (atomic, weights_only) and the importer of the authors' format."""
