"""Bundled ``config.json`` files of well-known models (``<org>--<name>.json``), used when a hub
config cannot be fetched (offline): ``tpplan plan`` and ``check`` need only the config, never weights."""
