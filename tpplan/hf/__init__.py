"""``tpplan import-hf``: transformers' own plans translated.

Imports tpplan.prove, tpplan.simulate, tpplan.plan and below."""
