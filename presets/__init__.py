"""Built-in presets shipped as TOML files in this folder."""
