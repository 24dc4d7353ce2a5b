"""Pipeline specs, shipped inside the package as nemo_rlhf.recipes (see pyproject.toml)."""
