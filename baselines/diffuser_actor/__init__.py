"""3D Diffuser Actor (3DDA) re-implementation (spec: ../shared/reference/diffuser_actor.md)."""
