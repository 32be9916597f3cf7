"""p3o: Pairwise Proximal Policy Optimization (P3O) for aligning language models with human feedback."""

__version__ = "0.1.0"
