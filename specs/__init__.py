"""Packaged as tpplan.specs (see pyproject.toml): shipped inside the wheel."""
