"""The control plane's HTTP face: admin API, probes, metrics, dashboard."""
