"""The headless command `kontext-train` (and `python -m kontext_train`), above the library."""
