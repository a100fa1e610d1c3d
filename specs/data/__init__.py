"""Packaged as tpplan.specs.data (see pyproject.toml): shipped inside the wheel."""
