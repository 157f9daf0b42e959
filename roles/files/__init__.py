"""Scripts the roles copy to hosts and run there, by the host's python3 or a release venv.

Each is one self-contained file: standard library only (torch and NVML where the release venv
has them), importing nothing of this project (an import-linter contract keeps it so)."""
