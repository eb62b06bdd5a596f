"""Representation analysis: effective rank, attention maps, reconstructions."""
