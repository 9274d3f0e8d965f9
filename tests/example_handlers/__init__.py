"""An example of user projections kept outside the package: `EVENTHANDLER_HANDLERS=tests.example_handlers.orders`."""
