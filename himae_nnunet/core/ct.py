"""The paper's preprocessing: 1.5 mm isotropic spacing, HU window [-175, 250] scaled to [0, 1]."""
DEFAULT_SPACING = (1.5, 1.5, 1.5)
DEFAULT_WINDOW = (-175.0, 250.0)
