"""capsmodels: capsule networks, routing, datasets, probes and the training loop (PyTorch only)."""
