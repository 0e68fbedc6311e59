"""The daemon's long-running children (``vllm serve``, ``llamafactory-cli``), whatever they run: a process group
started, waited for and stopped (:mod:`.process`), its record that outlives a daemon crash (:mod:`.record`),
and the environment it starts with (:mod:`.env`)."""
