"""Megatron glue."""
