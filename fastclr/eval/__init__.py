"""fastclr.eval."""
