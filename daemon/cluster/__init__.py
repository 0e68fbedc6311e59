"""Beyond one machine: ``[cluster] backend = "ray"`` hands placement and process launch of the train/eval/export
jobs to a Ray cluster; the daemon keeps the queue, admission, owners and loss curves (README "Beyond one
machine")."""
