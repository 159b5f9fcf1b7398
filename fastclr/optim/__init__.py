"""fastclr.optim."""
