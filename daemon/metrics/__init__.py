"""The Prometheus endpoint (``[metrics] listen``): what the daemon's parts show, collected at scrape time."""
