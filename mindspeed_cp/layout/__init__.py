"""Pure token layouts."""
