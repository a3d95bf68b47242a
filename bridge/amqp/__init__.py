"""The broker adapter (aio-pika): topology, connection, event publisher, command consumer."""
