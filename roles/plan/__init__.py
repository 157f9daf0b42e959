"""Pure planning: settings, the fleet plan, capacity, the GPU table, engine flags, GPU-health
decisions and the plan report. It reads inventory data, release manifests and model configs,
and never imports pyinfra (an import-linter contract in pyproject.toml keeps it so)."""
