"""Placeholder: filled in by the scalar-family superset work."""
