"""Headroom's analysis backend: plain functions and small dataclasses over tensors, no UI."""
