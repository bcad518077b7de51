"""Data utilities: synthetic benchmark scenes and ground-truth loaders."""
