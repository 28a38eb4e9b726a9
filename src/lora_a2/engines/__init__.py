"""Engines that run a federated experiment: ``local`` (in-process)."""
