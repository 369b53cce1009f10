"""The control plane, in layers, each importing only those below it (the import-linter contract in
pyproject.toml): cli and doctor, deploy, api, runtime, engine, config."""
