"""Engines: the decode loop (loop), Hugging Face generate() (loop.HFGenerateEngine) and continuous batching
(batch)."""
