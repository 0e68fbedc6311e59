"""Files members hand to the daemon (SCM_RIGHTS on handover.sock), kept by content; and writing inside the
daemon's own tree without following anyone's links (tree.py)."""
