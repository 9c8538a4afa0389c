"""worldflux-registry plugin module (hooks filled in by the family)."""
