"""The pipeline: model sources, stages and run folders (it knows recipe sections, not families)."""
