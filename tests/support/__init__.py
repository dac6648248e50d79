"""What the tests share, none of it a test: helpers in modules, fixtures in plugins.

- ``wait``: ``wait_until``, the one way to wait for observable state.
- ``servers``: where the test servers are (the test sandbox, or OUTBOX_TEST_EXTERNAL ones).
- ``db``: throw-away databases, the POS store, where a store's slot stands (``wait_slot_confirmed``).
- ``kafka``: kcat reads, topics, groups and offsets.
- ``processes``: ``outbox`` commands as real processes (relay, read-store consumer, any command).
- ``checksums``: what a read store or a CRM must end up holding, from the store databases.
- ``readstore``: read-store events and the consumer run in-process.
- ``metrics``, ``prometheus``: a process's /metrics, and the Prometheus tools.
- ``records``: values for unit tests.
- ``fixtures_servers``, ``fixtures_processes``: fixture plugins, named in tests/conftest.py.
"""
