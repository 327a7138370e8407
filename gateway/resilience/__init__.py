"""Backend faults and overload: what keeps a failing URL, a dying canary or too many
requests from becoming client errors (issue #11, items 5 and 6).

    config.py   the document's sections (outlier_detection, retry_budget, limits, fallback)
    outlier.py  passive outlier ejection per URL inside a backend (Envoy-style, pure)
    budget.py   the retry budget: retries at most N % of a backend's requests (pure)
    retry.py    whether and where a failed request goes again (another URL, canary → live)
    health.py   optional active health checks (one owned task per backend)
    limits.py   concurrency gates per route and per backend (503 + Retry-After beyond)
    metrics.py  their Prometheus families, computed at scrape time

Except the health checks, everything here is plain state updated from the proxy's hot path
without awaiting: no task, no lock, no timer. Ejections end lazily (the next pick looks at
the clock).
"""
