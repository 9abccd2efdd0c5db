"""Decoding with a trained GLM: blank filling (part A with masks, part B generated)."""
