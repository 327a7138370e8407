"""modelgate: a reverse-proxy gateway that carries ML deployment patterns.

Shadow mode, sticky canary with automatic ramp and rollback, blue-green switches and live
monitoring of software, input and output metrics, in front of any HTTP model server.
"""

__version__ = "0.1.0"
