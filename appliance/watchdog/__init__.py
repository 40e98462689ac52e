"""aipbx-watchdog: the supervisor daemon (DESIGN decision 9)."""
