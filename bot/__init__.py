"""bunshin's bot daemon (`python -m bot`): router, memory, queue and the single GPU worker."""
