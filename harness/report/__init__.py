"""Reports from run records (tables and figures arrive with the report issue)."""
