"""One file per PEFT method, each ending with its Method record (see peftkit.registry)."""
