"""The synthetic experiment of method.md §5: MDM vs IMDM at few sampling steps."""
