"""Command-line tools that are not pipeline stages: predict, generate, serve (labelling or
writing text with a trained adapter) and report (comparing DVC experiments)."""
