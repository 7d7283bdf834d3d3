"""Corpora: protocol readers, streaming datasets and the synthetic demo corpus."""
