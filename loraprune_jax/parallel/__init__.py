"""Meshes, sharding rules and multi-process set-up."""
