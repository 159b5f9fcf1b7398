"""fastclr.losses."""
