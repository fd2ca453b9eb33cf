"""Megatron-LM (``megatron.training``) integration: our flags in its parser, validation, batch split.

``PATCHES`` is spliced into ``megatron_adaptor.PATCHES``; targets under ``megatron.training`` are skipped
when Megatron-LM is not importable.
"""
PATCHES = []
