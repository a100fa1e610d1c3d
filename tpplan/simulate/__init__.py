"""``tpplan plan``: memory and every collective of a step at full size on a fake process group.

Imports tpplan.plan and below."""
