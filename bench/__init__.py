"""vgate's benchmark (`make bench`): the gateway against a simulated worker, direct and through."""
