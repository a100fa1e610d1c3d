"""``tpplan check``: the shrunken twin proven on CPU gloo ranks.

Imports tpplan.plan and below."""
