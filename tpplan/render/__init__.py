"""``tpplan compile`` and ``export``: the generated scripts from the templates, and a checkpoint as a Hugging Face folder.

Imports tpplan.plan and below."""
