"""fastclr.kernels."""
