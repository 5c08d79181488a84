"""Mini-Diffuser: the method under study (arXiv 2505.09430)."""
