"""Images: sizes and token counts (API process, no torch), GPU preprocessing (engine core)."""
