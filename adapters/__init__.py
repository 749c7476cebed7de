"""Platform adapters (Discord, LINE, console): platform events in, replies out. They never import each other."""
