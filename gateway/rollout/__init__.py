"""Progressive delivery: canary ramps judged by live gates, guarded blue-green."""
