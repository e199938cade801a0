"""RabbitMQ and dramatiq: broker, envelope check, actor wrapper, middleware, relay, dead letters, topology."""
