"""The networks and their losses, pure torch: what one step computes."""
