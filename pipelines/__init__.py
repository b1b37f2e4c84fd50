"""diffusers adapters."""
