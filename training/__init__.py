"""Training recipes for each node's model."""
