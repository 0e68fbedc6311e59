"""The Part protocol: how a part of the daemon plugs into it (written by the assembly refactor)."""
