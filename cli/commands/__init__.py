"""One module per sub-command; each is imported only when its command runs."""
