"""Models: the event tokenizer and feature batches, the item and user encoders, and the item vectors they read
(MiniLM text vectors, co-occurrence vectors)."""
