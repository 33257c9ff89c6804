"""Integrations of `trb`'s behavior policies into other training frameworks. Each lives in its own module and needs
its framework installed: `trb.integrations.trl` (pip install 'trb[trl]')."""
