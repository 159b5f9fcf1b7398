"""fastclr.pipelines."""
