"""Monitoring: software, input and output metrics, sliding windows, alarms."""
