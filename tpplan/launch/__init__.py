"""``tpplan run``: torchrun, multi-node, resume.

Imports tpplan.render and below."""
