"""Shipped environments for ``objective.environment``: ``calculator``, ``python``, ``guess_number``."""
