"""Pinned releases: manifests (what a person edits), locks (every package with its hash) and the
wheelhouse (the lock's wheels downloaded once on the control node). ``vllm-fleet release``."""
