"""Baseline policies (3D Diffuser Actor and its non-invasive variant)."""
