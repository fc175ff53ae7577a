"""Refinement of CAMs into labels: dense CRF (and, later, IRN)."""
