"""Control: pressure sources and triggers, the paper's gate, the concurrency limit, the adaptive limit."""
