"""Adapters that plug DiffLoss into other training frameworks; each imports its framework on
import, so import only the one you use (``diffloss_fast.integrations.basicsr``)."""
