"""Model sources: a transformers config or a model factory, built on the meta device; the shrunken twin's config.

Imports tpplan.spec and below."""
