"""Meshes from a string, the rules from logical axes to mesh axes, placing and gathering arrays,
activation constraints, and multi-process set-up; each model declares its own logical axes."""
