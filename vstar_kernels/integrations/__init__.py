"""Glue to host libraries (diffusers). Each submodule imports its host library; this package does not."""
