"""Packaged as tpplan.templates (see pyproject.toml): shipped inside the wheel."""
