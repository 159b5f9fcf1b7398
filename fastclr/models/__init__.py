"""fastclr.models."""
