"""Our depthwise and pointwise schedules (issue 3)."""
