"""The data side of chapter 7: load, check, split, format, tokenise and batch instruction records.

Everything here except ``dataset``/``collate`` is torch-free.
"""
