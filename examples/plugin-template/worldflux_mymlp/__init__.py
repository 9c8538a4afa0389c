"""mymlp: a minimal MLP world model family for worldflux-registry (the plugin template)."""
