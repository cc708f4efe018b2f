"""Modeling code shipped inside every compact export and loaded by transformers through ``auto_map``.

The two modules here import only torch and transformers: they are copied into the exported directory
and run in processes that have never heard of Headroom.
"""
