"""Preset training recipes shipped as TOML files."""
