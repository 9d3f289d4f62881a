"""safeprune: prune diffusion UNets, distill them from the teacher, and suppress concepts in one bilevel run."""

__version__ = "0.1.0"
