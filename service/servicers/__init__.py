"""Thin translation layers between the protos and the model manager's tensors."""
