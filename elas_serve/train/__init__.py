"""Bundled trainer: corpus -> tokenizer -> token shards -> ELAS checkpoint."""
