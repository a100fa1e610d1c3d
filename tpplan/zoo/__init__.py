"""``tpplan zoo``: every transformers plan imported, derived and proven.

Imports anything but the CLI."""
