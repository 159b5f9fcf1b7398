"""fastclr.train."""
