"""The plan stage: spec -> model -> resolved plan (every check, located), applying it (DTensor + FSDP2), and its report.

Imports tpplan.model and below."""
