"""Device profiles shipped with tpplan tune (one YAML file per device; every value cited)."""
