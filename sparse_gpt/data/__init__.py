"""Data: the TFDS text-corpus builder, tokenizers, SFT examples, grain iterators.
"""
