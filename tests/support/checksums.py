"""What the sinks must end up holding, computed from the store databases: the tests' oracles.

The same functions as the demo's final report (outbox/dev/oracles.py): one copy, so the demo and
the tests cannot come to disagree about what "converged" means.
"""
from __future__ import annotations

from outbox.dev.oracles import differences as crm_differences
from outbox.dev.oracles import expected_records as crm_expected_records
from outbox.dev.oracles import readstore_checksum, source_checksum

__all__ = ["crm_differences", "crm_expected_records", "readstore_checksum", "source_checksum"]
