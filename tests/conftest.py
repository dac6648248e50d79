"""The fixtures every suite shares are plugins in tests/support (helpers are modules there).

Under ``tests/unit`` nothing reaches a server; ``tests/integration`` and ``tests/faults`` use the
real PostgreSQL and Kafka servers of tests/support/servers.py.
"""
pytest_plugins = ["tests.support.fixtures_servers", "tests.support.fixtures_processes"]
