"""Evaluation: offline action accuracy on held-out keysteps (closed loop arrives with a later issue)."""
