"""The ``edgetune`` command line."""
