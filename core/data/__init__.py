"""Shared data plumbing: readers, validation, packing, collators, synthetic demo data."""
