"""Exporters of basic checkpoints to other libraries' formats (basic.export.open_clip)."""
