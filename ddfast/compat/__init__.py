"""Drop-in replacements for functions of published DD codebases (see dc.py, mtt.py)."""
