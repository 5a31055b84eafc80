"""Task data: reading files and bundled sets, tokenising each task type, batching."""
