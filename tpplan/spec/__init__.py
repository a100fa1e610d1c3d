"""The spec language: the pydantic schema (one class per style), the YAML loader with locations, the style registry, data files.

Imports tpplan.core and tpplan.runtime."""
