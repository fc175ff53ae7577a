"""The ACR method: equations, phases, schedules and optimisers. Knows nothing of Ray."""
